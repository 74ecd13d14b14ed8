"""Smoke test of sparsegan/bench.py's helpers at tiny sizes (the real run is `make bench`)."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from sparsegan import bench
from sparsegan.flops import count_flops


def test_flop_count_matches_torch_flop_counter_and_handles_double_backward():
    from sparsegan.models import build_detector
    from sparsegan.params import ModelParams, Params
    torch.manual_seed(0)
    detector = build_detector("sparse_gan", Params(model=ModelParams(base_channels=2)), 16)
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    with FlopCounterMode(display=False) as reference:
        detector.train_step(x, "generator")
    assert count_flops(lambda: detector.train_step(x, "generator"), 1) \
        == reference.get_total_flops() > 0
    fanogan = build_detector("fanogan", Params(model=ModelParams(base_channels=2)), 16)
    assert count_flops(lambda: fanogan.train_step(x, "gan"), 1) > 0  # gradient penalty


def test_contention_counts_other_processes_only():
    c = bench.Contention()
    sum(i * i for i in range(300_000))  # this process's own work is not "other"
    assert 0.0 <= c.others_cores() < 2.5


def test_jobs_report_every_figure(tmp_path):
    paths = bench.make_jpegs(tmp_path / "jpeg", 4)
    pre = bench.bench_preprocess(paths, 32, tmp_path / "processed", workers=1, repeats=1)
    assert pre["speedup_vs_plain"] > 0 and pre["ours_images_per_s"] > 0
    data = str(tmp_path / "processed" / "bench.npy")
    assert np.load(data).shape == (4, 1, 32, 32)
    job = bench.model_job("fanogan", 32, 2, 2, data, "cpu", train_seconds=0.0,
                            train_min_steps=1, score_batch=2, score_seconds=0.0)
    assert set(job["phases"]) == {"gan", "encoder"}
    for key in ("train_images_per_s", "train_gflops_per_image", "train_achieved_gflops",
                "score_images_per_s", "score_gflops_per_image", "peak_rss_mb"):
        assert job[key] > 0, key
    wait = bench.data_wait_job(data, "autoencoder", 32, 4, 2, "cpu", epochs=1, data_224=data)
    assert 0 <= wait["prefetch_2"]["data_wait_share"] < 1 and wait["batch_224x32_ms"] > 0
    peak = bench.peak_rates("cpu", n=128, seconds=0.01, conv_batch=1)
    assert peak["matmul_fp32_gflops"] > 0 and peak["conv_fp32_gflops"] > 0
    result = {"machine": {"summary": "test", "others_cores": 0.0, "max_others_cores": 0.0,
                          "device": "cpu"},
              "peak": peak, "preprocess": pre, "data_wait": wait,
              "train": {"default": {"size": 32, "base_channels": 4, "batch": 4,
                                    "models": {"sparse_gan": job}}},
              "ablations": {"all_measures": 2.0, "one_thread": 1.0},
              "pipeline": {"ratio": 0.2, "exp_run": "dvc exp run -S train.lambda_sp=25",
                           "full_repro_s": 600.0}}
    table = bench.markdown(result)
    assert "| sparse_gan |" in table and "0.20" in table and "0.50x" in table
    # the peak is the best measured rate: a conv-bound step at 30 GFLOP/s against a matmul rate
    # of 10 and a conv rate of 40 is 75% of peak, not 300%
    fast = {**result, "peak": {**peak, "matmul_fp32_gflops": 10.0, "conv_fp32_gflops": 40.0},
            "train": {"default": {**result["train"]["default"],
                                  "models": {"sparse_gan": {**job,
                                                              "train_achieved_gflops": 30.0}}}}}
    table = bench.markdown(fast)
    assert "**75%**" in table and "300%" not in table
