"""Launcher parsing, the device rule, process-group init on one process, per-rank seeding."""

from __future__ import annotations

import random
import socket

import numpy as np
import pytest
import torch

from sd_mlperf.config.schema import Config
from sd_mlperf.parallel import distributed as D
from sd_mlperf.parallel import launch as L
from sd_mlperf.utils.dist_info import DistInfo


@pytest.mark.parametrize(("nodelist", "hosts"), [
    ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
    ("gpu17", ["gpu17"]),
    ("a1,b[8-10]-ib", ["a1", "b8-ib", "b9-ib", "b10-ib"]),
    ("rack[1-2]-n[1,3]", ["rack1-n1", "rack1-n3", "rack2-n1", "rack2-n3"]),
    ("x[001-002],y", ["x001", "x002", "y"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert L.expand_nodelist(nodelist) == hosts


def test_expand_nodelist_rejects_bad_range():
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        L.expand_nodelist("n[5-2]")


def test_read_launch_env_torchrun():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3", "MASTER_ADDR": "h0", "MASTER_PORT": "1234",
           "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}  # torchrun inside an allocation wins
    got = L.read_launch_env(env)
    assert (got.launcher, got.rank, got.world_size, got.local_rank, got.master_addr, got.master_port) == (
        "torchrun", 3, 8, 3, "h0", 1234)


def test_read_launch_env_slurm_takes_first_host():
    env = {"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
           "SLURM_JOB_NODELIST": "dgx[07-08]", "SLURM_JOB_ID": "4321"}
    got = L.read_launch_env(env)
    assert (got.launcher, got.rank, got.world_size, got.local_rank, got.master_addr) == ("slurm", 9, 16, 1, "dgx07")
    assert got.master_port == L.DEFAULT_MASTER_PORT + 321
    env["MASTER_ADDR"], env["MASTER_PORT"] = "head", "777"
    got = L.read_launch_env(env)
    assert (got.master_addr, got.master_port) == ("head", 777)


def test_read_launch_env_none():
    got = L.read_launch_env({})
    assert (got.launcher, got.rank, got.world_size) == ("none", 0, 1)


def test_launch_env_reader_imports_no_torch():
    # The CLI reads the rank before any command runs; `sd-mlperf config` and `--help` must not pay for torch.
    import subprocess
    import sys

    code = "import sys, sd_mlperf.parallel.launch; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_pick_device_rule(monkeypatch):
    assert D.pick_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert D.pick_device("auto", local_rank=3) == torch.device("cpu")
    with pytest.raises(RuntimeError, match="run.device=cpu"):
        D.pick_device("cuda")
    with pytest.raises(ValueError, match="auto, cuda or cpu"):
        D.pick_device("gpu")


def test_pick_device_takes_the_local_rank_gpu(monkeypatch):
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    assert D.pick_device("auto", local_rank=1) == torch.device("cuda", 1) and chosen == [1]
    assert D.pick_device("cuda") == torch.device("cuda", 0)
    assert D.pick_device("cpu", local_rank=1) == torch.device("cpu")
    with pytest.raises(RuntimeError, match="local rank 2 has no GPU"):
        D.pick_device("cuda", local_rank=2)


def test_launch_dist_info_reads_the_launcher_without_a_process_group():
    torchrun = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}
    assert D.launch_dist_info("cpu", torchrun) == DistInfo(3, 4, 1, torch.device("cpu"), "none")
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "n[1-2]"}
    assert D.launch_dist_info("cpu", slurm) == DistInfo(5, 8, 1, torch.device("cpu"), "none")
    assert D.launch_dist_info("cpu", {}) == DistInfo(0, 1, 0, torch.device("cpu"), "none")
    assert not torch.distributed.is_initialized()


def _clear_launch_env(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):
        monkeypatch.delenv(var, raising=False)


def test_init_single_process(monkeypatch):
    _clear_launch_env(monkeypatch)
    cfg = Config()
    cfg.run.device = "cpu"
    info = D.init_distributed(cfg.run, cfg.parallel)
    assert info == DistInfo(0, 1, 0, torch.device("cpu"), "none")
    assert info.is_main
    assert not torch.distributed.is_initialized()
    D.destroy_distributed()  # a no-op without a group


def test_init_world_size_mismatch_names_keys(monkeypatch):
    _clear_launch_env(monkeypatch)
    cfg = Config()
    cfg.run.device = "cpu"
    cfg.parallel.gpus_per_node = 8
    with pytest.raises(ValueError, match=r"parallel\.num_nodes.*parallel\.gpus_per_node"):
        D.init_distributed(cfg.run, cfg.parallel)


def test_init_cuda_requested_without_gpu(monkeypatch):
    _clear_launch_env(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = Config()
    cfg.run.device = "cuda"
    with pytest.raises(RuntimeError, match="run.device=cpu"):
        D.init_distributed(cfg.run, cfg.parallel)


def test_init_fails_at_once_when_the_rendezvous_host_does_not_resolve(monkeypatch):
    # A Slurm cluster whose node names are not in DNS: the first host of the node list cannot be the rendezvous.
    _clear_launch_env(monkeypatch)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "n[1-2]")

    def no_such_host(host, *args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_such_host)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda **kw: pytest.fail("must not rendezvous"))
    cfg = Config()
    cfg.run.device = "cpu"
    cfg.parallel.num_nodes = 2
    with pytest.raises(RuntimeError, match=r"'n1' .* does not resolve .*export MASTER_ADDR=.*NodeAddr"):
        D.init_distributed(cfg.run, cfg.parallel)


def test_check_resolves_accepts_an_address():
    D.check_resolves("127.0.0.1")  # what slurm/srun.sh exports from a NodeAddr


def test_seed_everything_reproducible_and_per_rank():
    def draw(seed, rank):
        gen = D.seed_everything(seed, rank)
        return (random.random(), float(np.random.rand()), torch.rand(3), torch.rand(3, generator=gen))

    a, b, c = draw(42, 0), draw(42, 0), draw(42, 1)
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2]) and torch.equal(a[3], b[3])
    assert a[0] != c[0] and a[1] != c[1] and not torch.equal(a[2], c[2]) and not torch.equal(a[3], c[3])
    # Not seed + rank: (seed 42, rank 1) and (seed 43, rank 0) are different streams.
    assert D.rank_seed(42, 1) != D.rank_seed(43, 0)


def test_configure_device_changes_nothing_on_cpu():
    before = torch.backends.cudnn.benchmark
    D.configure_device(torch.device("cpu"))
    assert torch.backends.cudnn.benchmark == before
