"""Time-to-train projection: RCP samples to converge as mlperf-logging's RCP checker takes them."""

from __future__ import annotations

import pytest

from sd_mlperf.report.projection import load_rcps, olympic_mean, project_time_to_train, rcp_samples_to_converge


@pytest.fixture(scope="module")
def checker():
    from mlperf_logging.rcp_checker.rcp_checker import RCP_Checker

    return RCP_Checker("training", "5.0.0", "stable_diffusion", False)


def _checker_rcp(checker, bs):
    return next(r for r in checker.rcp_data.values() if r["BS"] == bs)


def test_the_rcp_file_has_the_five_batch_sizes_of_the_rules():
    assert list(load_rcps()) == [256, 384, 512, 1024, 2048]


def test_olympic_mean_drops_one_run_at_each_end():
    assert olympic_mean([1, 100, 5, 7, 0]) == pytest.approx((1 + 5 + 7) / 3)


def test_a_known_batch_takes_the_olympic_mean_the_rcp_checker_computes(checker):
    got = rcp_samples_to_converge(512)
    assert got.samples == pytest.approx(2_104_888.888, abs=1e-2)  # 20 runs, the fastest and slowest dropped
    assert got.samples == pytest.approx(_checker_rcp(checker, 512)["RCP Mean"])
    assert got.in_range and "olympic mean of the 20 RCP runs at BS 512" in got.source
    assert "training_5.0.0/rcps_stable_diffusion.json" in got.source


def test_a_batch_between_rcps_is_interpolated_as_the_checker_does(checker):
    got = rcp_samples_to_converge(768)
    _, interp = checker._create_interp_rcp(768, _checker_rcp(checker, 512), _checker_rcp(checker, 1024))
    assert got.samples == pytest.approx(interp["RCP Mean"])
    assert got.samples == pytest.approx((2_104_888.889 + 2_839_272.727) / 2, abs=1e-2)
    assert got.in_range and "interpolated between the olympic means at BS 512" in got.source


@pytest.mark.parametrize(("bs", "used", "why"), [(64, 256, "smaller batch"), (4096, 2048, "new RCP")])
def test_a_batch_outside_the_rcp_range_says_so(bs, used, why):
    got = rcp_samples_to_converge(bs)
    assert not got.in_range
    assert got.samples == pytest.approx(rcp_samples_to_converge(used).samples)
    assert "outside the RCP range 256..2048" in got.source and why in got.source


def test_projection_is_samples_over_images_per_second():
    p = project_time_to_train(512, 137.0, 64, throughput_source="given")
    assert p.img_per_s == pytest.approx(137.0 * 64)
    assert p.minutes == pytest.approx(2_104_888.889 / (137.0 * 64) / 60)
    text = "\n".join(p.lines())
    assert "global batch 512 on 64 GPU(s)" in text and "137.0 img/s per GPU (given) x 64" in text
    assert f"{p.minutes:.1f} min" in text


def test_projection_needs_a_speed():
    with pytest.raises(ValueError, match="img/s per GPU > 0"):
        project_time_to_train(512, 0.0, 8, throughput_source="given")


def test_projection_says_whether_the_run_trains_with_the_rcps_hyperparameters():
    same = project_time_to_train(256, 100.0, 8, throughput_source="given", base_lr_per_sample=2.8e-7,
                                 warmup_steps=1000)
    assert "those of sd_ref_256" in same.lines()[-1]
    other = project_time_to_train(256, 100.0, 8, throughput_source="given", base_lr_per_sample=1.25e-7,
                                  warmup_steps=1000)
    assert "match no RCP" in other.lines()[-1] and "sd_ref_256" in other.lines()[-1]
    assert other.minutes == same.minutes  # the samples are the RCP's at this batch either way
