"""GPU check: train sparse_gan at the paper's setting on one CUDA GPU for a fixed number of steps.

Usage (from the repository root, on a machine with a CUDA GPU)::

    python scripts/gpu_check.py [--steps 100] [--warmup 10] [--batch 32] [--compile] [--out FILE]

The paper's setting: 224x224 inputs, base width 64 (a 1024x7x7 latent), batch 32, Adam; here
with the training loop's own GPU measures: bf16 autocast, channels_last, cudnn.benchmark, and
the data path of ``sparsegan.train`` (a uint8 memory-mapped array, gathered by a prefetch thread
into page-locked memory, copied asynchronously, converted to float on the GPU). The data are
smooth random images (speed does not depend on their content). It prints images/s, the projected
time of one epoch over the paper's 50,140 training images, the peak GPU memory, the share of the
time spent waiting for data, and the achieved FLOP/s against a bf16 matmul timed on the same GPU.
It stops after ``--max-seconds`` (default 240) even if the steps are not done, so that it stays
under 5 minutes. Without a CUDA GPU it refuses with a message and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

PAPER_TRAIN_IMAGES = 50_140  # normal training scans of OCT2017 v3 minus 1,000 for validation


def smooth_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """(n, 1, size, size) uint8 band patterns with noise, OCT-like enough for timing."""
    rng = np.random.default_rng(seed)
    yy = np.linspace(0, 1, size, dtype=np.float32)[:, None]
    xx = np.linspace(0, 1, size, dtype=np.float32)[None, :]
    out = np.empty((n, 1, size, size), np.uint8)
    for i in range(n):
        f, phase, tilt = rng.uniform(3, 8), rng.random(), rng.uniform(-0.3, 0.3)
        img = 0.45 + 0.3 * np.sin(2 * np.pi * (f * (yy + tilt * (xx - 0.5) ** 2) + phase))
        img = img + 0.08 * rng.standard_normal((size, size), dtype=np.float32)
        out[i, 0] = np.clip(img * 255, 0, 255).astype(np.uint8)
    return out


def bf16_matmul_tflops(device, n: int = 8192, reps: int = 20) -> float:
    import torch
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    tic = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize(device)
    return 2 * n**3 * reps / (time.perf_counter() - tic) / 1e12


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    from sparsegan.params import MODELS  # torch-free
    ap.add_argument("--model", "--variant", dest="model", default="sparse_gan", choices=MODELS)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--base", type=int, default=64, help="model.base_channels")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=100, help="timed training steps")
    ap.add_argument("--warmup", type=int, default=10, help="untimed steps first (cuDNN autotune)")
    ap.add_argument("--images", type=int, default=1024, help="images in the memmapped array")
    ap.add_argument("--max-seconds", type=float, default=240.0)
    ap.add_argument("--compile", action="store_true", help="runtime.compile (torch.compile)")
    ap.add_argument("--out", help="also write the results as JSON here")
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # cpu: logic smoke test
    args = ap.parse_args(argv)

    import torch
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU is visible to torch "
              f"(torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}); this "
              "check needs one. On a CPU-only machine run `make bench` instead.", file=sys.stderr)
        return 2

    from sparsegan.data.dataset import iterate_batches
    from sparsegan.flops import count_flops  # FLOP formulas of torch.utils.flop_counter
    from sparsegan.params import ModelParams, Params, RuntimeParams, TrainParams
    from sparsegan.train import compile_networks, setup_detector, train_step

    started = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    params = Params(model=ModelParams(base_channels=args.base),
                    train=TrainParams(batch_size=args.batch),
                    runtime=RuntimeParams(device=device.type))
    # the training's own set-up and step (sparsegan.train); compiled below, after the count
    detector = setup_detector(args.model, 0, params, args.size, device)
    phase = detector.phases()[0]
    # counted FLOPs of one step (eager, before any compilation; the step's update is harmless)
    zeros = torch.zeros(args.batch, 1, args.size, args.size, device=device)
    flops = count_flops(lambda: train_step(detector, zeros, phase, device), 1) / args.batch
    del zeros
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if args.compile:
        compile_networks(detector)
    n_params = sum(p.numel() for p in detector.parameters())

    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        path = Path(tmp) / "train.npy"
        np.save(path, smooth_images(max(args.images, args.batch), args.size))
        images = np.load(path, mmap_mode="r")
        generator = torch.Generator().manual_seed(0)

        def batches():
            while True:  # epochs over the memmap, as the training loop reads it
                yield from iterate_batches(images, args.batch, shuffle=True, generator=generator,
                                           drop_last=True, device=device,
                                           pin_memory=device.type == "cuda", prefetch=2)

        stream = batches()

        def step() -> float:
            tic = time.perf_counter()
            x = next(stream)
            waited = time.perf_counter() - tic
            train_step(detector, x, phase, device)  # returns floats: synchronises every step
            return waited

        print(f"[gpu_check] {args.model} {args.size}x{args.size}, base {args.base} "
              f"({n_params / 1e6:.1f} M parameters), batch {args.batch}, bf16 autocast, "
              f"channels_last{', torch.compile' if args.compile else ''} on "
              f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}",
              file=sys.stderr)
        for _ in range(args.warmup):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        warm_s = time.perf_counter() - started
        waited, steps, tic = 0.0, 0, time.perf_counter()
        while steps < args.steps and time.perf_counter() - started < args.max_seconds:
            waited += step()
            steps += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - tic
        stream.close()

    if steps == 0:
        print("gpu_check: no timed step within --max-seconds", file=sys.stderr)
        return 1
    ips = steps * args.batch / seconds
    result = {"model": args.model, "size": args.size, "base_channels": args.base,
              "batch": args.batch, "parameters_M": round(n_params / 1e6, 2),
              "compile": args.compile, "timed_steps": steps, "warmup_steps": args.warmup,
              "warmup_s": round(warm_s, 1), "step_ms": round(1e3 * seconds / steps, 2),
              "images_per_s": round(ips, 1),
              "projected_epoch_s": round(PAPER_TRAIN_IMAGES / ips, 1),
              "projected_50_epochs_h": round(50 * PAPER_TRAIN_IMAGES / ips / 3600, 2),
              "data_wait_share": round(waited / seconds, 4)}
    result["gflops_per_image"] = round(flops / 1e9, 3)
    result["achieved_tflops"] = round(flops * ips / 1e12, 2)
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(device)
        result["peak_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        result["peak_reserved_gb"] = round(torch.cuda.max_memory_reserved(device) / 2**30, 2)
        peak = bf16_matmul_tflops(device)
        result["bf16_matmul_tflops"] = round(peak, 1)
        result["fraction_of_bf16_matmul"] = round(result["achieved_tflops"] / peak, 3)
    result["total_s"] = round(time.perf_counter() - started, 1)

    print(f"images/s: {result['images_per_s']}  ({result['step_ms']} ms per step of "
          f"{args.batch}, {steps} timed steps after {args.warmup} warm-up)")
    print(f"projected epoch over {PAPER_TRAIN_IMAGES:,} images: "
          f"{result['projected_epoch_s'] / 60:.1f} min  (50 epochs: "
          f"{result['projected_50_epochs_h']} h)")
    if device.type == "cuda":
        print(f"peak GPU memory: {result['peak_memory_gb']} GiB allocated "
              f"({result['peak_reserved_gb']} GiB reserved)")
        print(f"achieved: {result['achieved_tflops']} TFLOP/s counted = "
              f"{result['fraction_of_bf16_matmul']:.0%} of a bf16 matmul on this GPU "
              f"({result['bf16_matmul_tflops']} TFLOP/s)")
    print(f"waiting for data: {result['data_wait_share']:.1%} of the time")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")
    sys.exit(main())
