"""The evaluator end to end on tiny models: outputs, determinism, and 1 vs 2 processes (gloo) identical.

One spawned job runs the 2-process evaluation (process start-up costs about 10 s); the parent runs
the 1-process one and compares bit for bit: whole global batches ({0,1,2} and {3,4}) go to the
ranks, so each image is computed in the same batch either way.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.multiprocessing as mp
from eval_helpers import build_parts, free_port, make_cfg

from sd_mlperf.data.synthetic import make_synthetic_dataset
from sd_mlperf.eval.evaluator import build_evaluator
from sd_mlperf.eval.fid import ensure_folder_fid_stats
from sd_mlperf.eval.inception import load_fid_inception
from tests.multiprocess_helpers import set_torchrun_env


def _prepare(tmp_path):
    """The smoke validation prompts and images, and the FID statistics of those images (the smoke assets)."""
    cfg = make_cfg(tmp_path)
    paths = make_synthetic_dataset(cfg.data.synthetic_dir, cfg.data.synthetic)
    ensure_folder_fid_stats(paths.val_images_dir, cfg.eval.fid_stats, load_fid_inception(cfg.eval.inception_weights,
                                                                                          "cpu"))
    return cfg


def _evaluate(cfg, rank, world, out_subdir):
    unet, vae, text_encoder = build_parts(cfg)
    evaluator = build_evaluator(cfg, vae=vae, text_encoder=text_encoder, rank=rank, world_size=world,
                                device="cpu", run_dir=os.path.join(cfg.run.output_dir, cfg.run.name),
                                out_subdir=out_subdir)
    result = evaluator.evaluate(unet, samples_count=40, step=10)
    return {"fid": result.fid, "clip": result.clip, "num_images": result.num_images, "extra": result.extra,
            "grid": str(result.grid_path) if result.grid_path else None}


def _worker(rank: int, port: int, tmp_path: str, out: str) -> None:
    torch.set_num_threads(1)
    set_torchrun_env(rank, 2, port)
    from pathlib import Path

    from sd_mlperf.parallel.distributed import destroy_distributed, init_distributed

    cfg = make_cfg(Path(tmp_path), "parallel.gpus_per_node=2")
    init_distributed(cfg.run, cfg.parallel)
    try:
        torch.save(_evaluate(cfg, rank, 2, "eval_x2"), os.path.join(out, f"rank{rank}.pt"))
    finally:
        destroy_distributed()


@pytest.mark.slow
def test_one_and_two_processes_give_identical_metrics(tmp_path):
    cfg = _prepare(tmp_path)
    single = _evaluate(cfg, 0, 1, "eval")
    again = _evaluate(cfg, 0, 1, "eval_again")
    assert single == {**again, "grid": single["grid"]}  # deterministic: same seed, same images
    mp.spawn(_worker, args=(free_port(), str(tmp_path), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for r in ranks:
        assert r["num_images"] == 5  # 3 + 2 prompts, no padding counted
        assert r["fid"] == single["fid"] and r["clip"] == single["clip"], (r, single)
        assert r["extra"] == single["extra"] and single["extra"], (r, single)  # toy metrics: gathered in order
    assert ranks[0]["grid"] and ranks[1]["grid"] is None  # only rank 0 writes


def test_outputs_grid_and_json(tmp_path):
    cfg = _prepare(tmp_path)
    unet, vae, text_encoder = build_parts(cfg)
    evaluator = build_evaluator(cfg, vae=vae, text_encoder=text_encoder, rank=0, world_size=1, device="cpu",
                                run_dir=tmp_path / "run")
    unet.train()
    result = evaluator.evaluate(unet, samples_count=40, step=10)
    assert unet.training  # restored
    assert result.num_images == 5 and result.seconds > 0
    assert set(result.timings_s) == {"generation", "inception", "clip", "extra_metrics", "gather_and_metrics"}
    assert set(result.extra) == {"toy_background_acc", "toy_object_acc", "toy_latent_fd"}  # synthetic prompts
    assert result.grid_path == tmp_path / "run" / "eval" / "step_0000010.png" and result.grid_path.is_file()
    record = json.loads(result.json_path.read_text())
    assert record["fid"] == result.fid and record["clip"] == result.clip and record["samples_count"] == 40
    assert record["extra"] == result.extra
    assert record["ddim_steps"] == 2 and record["guidance_scale"] == 8.0
    assert -1.0 <= result.clip <= 1.0 and result.fid >= 0
    # One evaluator scores checkpoints of several runs: each evaluation may write into its own directory.
    other = evaluator.evaluate(unet, samples_count=40, step=10, out_dir=tmp_path / "other" / "eval_offline")
    assert other.grid_path == tmp_path / "other" / "eval_offline" / "step_0000010.png" and other.grid_path.is_file()
    assert other.json_path.parent == other.grid_path.parent and evaluator.out_dir == tmp_path / "run" / "eval"
    assert (other.fid, other.clip) == (result.fid, result.clip)


def test_too_few_prompts_is_a_config_error(tmp_path):
    cfg = _prepare(tmp_path)
    cfg.eval.num_prompts = 50
    _, vae, text_encoder = build_parts(cfg)
    with pytest.raises(ValueError, match="eval.num_prompts"):
        build_evaluator(cfg, vae=vae, text_encoder=text_encoder, rank=0, world_size=1, device="cpu",
                        run_dir=tmp_path)


def test_image_of_a_prompt_does_not_depend_on_its_batch(tmp_path):
    from sd_mlperf.diffusion.ddim import make_ddim_schedule
    from sd_mlperf.diffusion.schedule import make_alphas_cumprod
    from sd_mlperf.eval.evaluator import encode_prompts, generate_images

    cfg = make_cfg(tmp_path)
    unet, vae, text_encoder = build_parts(cfg)
    cpu = torch.device("cpu")
    schedule = make_ddim_schedule(make_alphas_cumprod(cfg.diffusion), cfg.eval.ddim_steps)
    uncond = encode_prompts(text_encoder, [""], "fp32", cpu)

    def images(captions, indices, seed=0):
        return generate_images(unet, captions, indices, cfg=cfg.eval, noise_seed=seed, schedule=schedule,
                               uncond=uncond, text_encoder=text_encoder, vae=vae,
                               scale_factor=cfg.model.vae.scale_factor, latent_shape=(4, 4, 4), device=cpu)

    captions = ["a red cube", "a blue ball on grass", "a green cone"]
    batch = images(captions, [4, 5, 6])
    assert batch.shape == (3, 3, 32, 32) and batch.min() >= 0 and batch.max() <= 1
    torch.testing.assert_close(images(captions[1:2], [5]), batch[1:2], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(images(captions[1:2], [5], seed=1), batch[1:2])
