"""Benchmark of this machine: where the time of the pipeline goes, as ratios.

Usage (from the repository root; ``make bench`` runs the default)::

    python scripts/bench.py [--out reports/bench.json] [--pipeline] [--compile] [--quick]

Writes ``reports/bench.json`` and prints a short markdown table (ratios first). Figures:

* ``peak``: the machine's measured fp32 rates in the same run, a 2048x2048 matmul (MKL on CPU)
  and a 64->64 3x3 convolution on 32x64x64x64 (oneDNN on CPU, cuDNN on CUDA), with all threads
  and with one; on CUDA also a bf16 matmul (training runs under bf16 autocast there). Best of
  three timings each.
* ``preprocess``: 2,048 synthetic 512x496 B-scans saved as JPEG (quality 92, like OCT2017's) ->
  224x224 uint8: the plain PIL loop (open, ``convert("L")``, ``resize`` BILINEAR) against our
  path (``preprocess_split``: libjpeg draft decoding at a reduced DCT scale, every core, file
  digests and the memory-mapped output included) and against draft decoding on one core (how
  much of the gain is the decoder and how much the cores). Best of two runs each. On these
  noisy scans (like real ones) Huffman decoding dominates, which reduced-DCT decoding cannot
  shorten: the decoder's gain is mostly the cheaper resize from the half-size image.
* ``train``: per trained model, images/s of its training step (``sparsegan.train.setup_detector``
  and ``train_step``, the training's own) at the default size of
  ``params.yaml`` (64x64, base width 16, batch 32) and at the paper's 224x224 with base width 64
  (batch 8 on CPU, 32 on CUDA, a few steps), with the model's counted FLOPs per image
  (``torch.utils.flop_counter.FlopCounterMode`` over whole steps / images; f-AnoGAN over
  ``n_critic`` steps, which include one G step) and the achieved FLOP/s as a fraction of the
  peak, the best of the measured matmul and conv rates (so no fraction exceeds 100%). f-AnoGAN's two phases are timed separately. Each (model,
  size) runs in a fresh process, so that its peak memory (``ru_maxrss``; CUDA:
  ``max_memory_allocated``) is its own.
* ``inference``: images/s of every score of the model at once (``sparsegan.scoring.score_batch``,
  as the score stage runs it; AnoGAN's z search with its default ``search_steps`` included),
  after training steps, in eval mode.
* ``data_wait``: the share of a training epoch spent waiting for the next batch in the training
  loop's own iterator (``iterate_batches`` over the uint8 memmap, shuffled, with and without the
  prefetch thread), sparse_gan at the default size, where the step is shortest; plus the time to
  produce one 224x224 batch of 32, to set against a GPU's step time.
* ``ablations``: sparse_gan at the default size with each CPU speed measure undone (NCHW instead
  of channels_last; D's weight gradients computed in the G step; one thread).
* ``pipeline`` (``--pipeline``, off by default: it takes about as long as ``dvc repro``): a full
  default ``dvc repro`` in a temporary copy of the repository, then an experiment that changes
  one param of one model, ``dvc exp run -S train.lambda_sp=25`` (params.yaml's value is
  already the paper's 50, so ``-S train.lambda_sp=50`` would change nothing and run nothing);
  the ratio of the two times (target at most 1/3).

Timings on a machine shared with other jobs are unreliable (two OpenMP threads on two busy cores
wait for each other): the load average is recorded before and after every measurement.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing as mp
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from .flops import count_flops
from .spec import MODELS

ROOT = Path(__file__).resolve().parents[1]  # the repository


BUSY_LIMIT = 0.15  # cores used by other processes (mean) above which timings are flagged


def load() -> float:
    return round(os.getloadavg()[0], 2)


def _busy_cpu_s() -> float:
    """CPU seconds all processes of the machine have used since boot (/proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    t = os.times()  # this process and its finished (reaped) children
    return t.user + t.system + t.children_user + t.children_system


class Contention:
    """How many cores *other* processes kept busy, on average, since creation: the machine's
    busy CPU time minus this process tree's, over the wall time. The load average cannot say
    it (it counts the benchmark's own threads)."""

    def __init__(self) -> None:
        self.t, self.busy, self.own = time.perf_counter(), _busy_cpu_s(), _own_cpu_s()

    def others_cores(self) -> float:
        wall = time.perf_counter() - self.t
        other = (_busy_cpu_s() - self.busy) - (_own_cpu_s() - self.own)
        return round(max(0.0, other) / wall, 3) if wall > 0 else 0.0


def rss_mb() -> float:
    """Current resident set size of this process, MB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def _sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device, min_seconds: float, min_reps: int = 3, max_reps: int = 1000) -> float:
    """Seconds per call of ``fn``: at least ``min_reps`` calls and ``min_seconds``."""
    reps, tic = 0, time.perf_counter()
    while reps < min_reps or (time.perf_counter() - tic < min_seconds and reps < max_reps):
        fn()
        reps += 1
    _sync(device)
    return (time.perf_counter() - tic) / reps


# ------------------------------------------------------------------------------------- peaks

def peak_rates(device_name: str = "cpu", threads: int = 0, n: int = 2048,
               seconds: float = 1.0, conv_batch: int = 32) -> dict:
    """Measured GFLOP/s of a fp32 ``n x n`` matmul and of a 64->64 3x3 conv on
    ``conv_batch``x64x64x64 (best of three timings; NCHW and channels_last, the better one)."""
    import torch
    import torch.nn.functional as F
    device = torch.device(device_name)
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        out: dict = {"threads": torch.get_num_threads()}
        a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
        dtypes = [("fp32", torch.float32)] + ([("bf16", torch.bfloat16)]
                                               if device.type == "cuda" else [])
        for name, dtype in dtypes:
            x, y = a.to(dtype), b.to(dtype)
            for _ in range(3):
                x @ y
            best = min(_timed(lambda: x @ y, device, seconds / 3) for _ in range(3))
            out[f"matmul_{name}_gflops"] = round(2 * n**3 / best / 1e9, 1)
        x = torch.randn(conv_batch, 64, 64, 64, device=device)
        w = torch.randn(64, 64, 3, 3, device=device)
        flops = 2 * conv_batch * 64 * 64 * 64 * 64 * 9
        best = float("inf")
        for fmt in (torch.contiguous_format, torch.channels_last):
            xf, wf = x.contiguous(memory_format=fmt), w.contiguous(memory_format=fmt)
            for _ in range(2):
                F.conv2d(xf, wf, padding=1)
            best = min([best] + [_timed(lambda: F.conv2d(xf, wf, padding=1), device, seconds / 3)
                                 for _ in range(3)])
        out["conv_fp32_gflops"] = round(flops / best / 1e9, 1)
        return out
    finally:
        torch.set_num_threads(old)


# -------------------------------------------------------------------------------- preprocess

def _make_jpeg(args: tuple[Path, int, int]) -> Path:
    from PIL import Image

    from sparsegan.data.synthetic import JPEG_QUALITY, generate_scan
    from sparsegan.params import CLASSES
    folder, i, seed = args
    cls = CLASSES[i % len(CLASSES)]
    image, _ = generate_scan(np.random.default_rng([seed, i]), cls, 496, 512)
    path = folder / f"{cls}-{i}-1.jpeg"
    Image.fromarray(image, mode="L").save(path, "JPEG", quality=JPEG_QUALITY)
    return path


def make_jpegs(folder: Path, n: int, seed: int = 0, workers: int = 0) -> list[Path]:
    """``n`` synthetic 512x496 B-scans of all four classes as JPEG (quality 92, as the synthetic
    source writes them), in ``folder``; generated on ``workers`` processes (0: all cores)."""
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(folder, i, seed) for i in range(n)]
    workers = min(workers or os.cpu_count() or 1, n)
    if workers <= 1:
        return [_make_jpeg(j) for j in jobs]
    with mp.get_context("fork").Pool(workers) as pool:
        return pool.map(_make_jpeg, jobs, chunksize=16)


def plain_pil(paths: list[Path], size: int) -> np.ndarray:
    """The plain loop: open, convert("L"), resize BILINEAR, one process."""
    from PIL import Image
    out = np.empty((len(paths), 1, size, size), np.uint8)
    for i, p in enumerate(paths):
        with Image.open(p) as im:
            out[i, 0] = np.asarray(im.convert("L").resize((size, size),
                                                          Image.Resampling.BILINEAR))
    return out


def draft_one_core(paths: list[Path], size: int) -> np.ndarray:
    """Our decoder (``load_gray``: draft decoding) in one process."""
    from sparsegan.data.preprocess import load_gray
    out = np.empty((len(paths), 1, size, size), np.uint8)
    for i, p in enumerate(paths):
        out[i, 0] = load_gray(p, size)
    return out


def bench_preprocess(paths: list[Path], size: int, work: Path, workers: int = 0,
                     repeats: int = 2) -> dict:
    """images/s of the plain PIL loop, draft decoding on one core and ``preprocess_split``."""
    import pandas as pd

    from sparsegan.data.preprocess import preprocess_split
    df = pd.DataFrame({"path": [str(p) for p in paths], "label": 0, "class": "NORMAL"})
    rates: dict[str, list[float]] = {}

    def run(name, fn) -> None:
        tic = time.perf_counter()
        fn()
        rates.setdefault(name, []).append(len(paths) / (time.perf_counter() - tic))

    with contextlib.redirect_stderr(io.StringIO()):  # the progress bar
        for _ in range(repeats):
            run("plain_pil", lambda: plain_pil(paths, size))
            run("draft_1core", lambda: draft_one_core(paths, size))
            run("ours", lambda: preprocess_split(df, size, work, "bench", workers))
    best = {k: max(v) for k, v in rates.items()}
    return {"images": len(paths), "source": "512x496 JPEG (synthetic, quality 92)",
            "size": size, "workers": workers or os.cpu_count(),
            "plain_pil_images_per_s": round(best["plain_pil"], 1),
            "draft_1core_images_per_s": round(best["draft_1core"], 1),
            "ours_images_per_s": round(best["ours"], 1),
            "speedup_vs_plain": round(best["ours"] / best["plain_pil"], 2),
            "draft_speedup_1core": round(best["draft_1core"] / best["plain_pil"], 2)}


# ------------------------------------------------------------------------ per-model jobs

def _params(size: int, base: int, batch: int, device: str, compile: bool = False):
    from sparsegan.params import ModelParams, Params, RuntimeParams, TrainParams
    return Params(model=ModelParams(base_channels=base), train=TrainParams(batch_size=batch),
                  runtime=RuntimeParams(device=device, compile=compile))


def _batch(data: str, batch: int, device):
    import torch

    from sparsegan.data.dataset import to_float
    images = np.load(data, mmap_mode="r")
    idx = np.arange(batch) % len(images)
    return to_float(images[idx], device).contiguous(memory_format=torch.channels_last)


def model_job(model: str, size: int, base: int, batch: int, data: str, device_name: str,
                train_seconds: float = 2.0, train_min_steps: int = 2, score_batch: int = 0,
                score_seconds: float = 1.0, count_score_flops: bool = True,
                channels_last: bool = True, freeze_d: bool = True, threads: int = 0,
                compile: bool = False) -> dict:
    """Train-step and score throughput of one model at one size, with FLOPs and peak memory.
    Meant to run in a fresh process (peak memory is the process's)."""
    import torch

    from sparsegan.scoring import score_batch as score_all
    from sparsegan.checkpoint import resolve_device
    from sparsegan.train import autocast, setup_detector, train_step
    if threads:
        torch.set_num_threads(threads)
    if not freeze_d:  # ablation: D's weight gradients computed in the G step, as before
        import sparsegan.models.sparse_gan as sg
        sg.frozen = lambda *m, **k: contextlib.nullcontext()
    device = resolve_device(device_name)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    out: dict = {"model": model, "size": size, "base_channels": base, "batch": batch,
                 "threads": torch.get_num_threads(), "load_before": load(),
                 "start_rss_mb": round(rss_mb(), 1)}
    params = _params(size, base, batch, device.type, compile)
    # the training's own set-up and step (sparsegan.train), NCHW only for the ablation
    detector = setup_detector(model, 0, params, size, device, channels_last=channels_last)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = _batch(data, batch, device).contiguous(memory_format=fmt)
    phases = list(dict.fromkeys(detector.phases()))  # e.g. ["gan", "encoder"]
    epochs = detector.phases()
    out["phases"] = {}
    for phase in phases:
        def step(phase=phase):
            train_step(detector, x, phase, device, channels_last=channels_last)
        group = detector.p.n_critic if model == "fanogan" and phase == "gan" else 1
        for _ in range(1 if not compile else 3 * group):  # warm-up (and compilation)
            step()
        _sync(device)
        flops = count_flops(step, group) / (group * batch)  # warms f-AnoGAN's G step too
        times: list[float] = []
        tic = time.perf_counter()
        while (len(times) * group < max(train_min_steps, group)
               or time.perf_counter() - tic < train_seconds):
            t = time.perf_counter()
            for _ in range(group):
                step()
            _sync(device)
            times.append((time.perf_counter() - t) / group)
        # the median step: robust to other jobs taking the cores for a moment
        seconds, reps = float(np.median(times)), len(times) * group
        out["phases"][phase] = {"images_per_s": round(batch / seconds, 2),
                                "step_s": round(seconds, 4), "steps": reps,
                                "gflops_per_image": round(flops / 1e9, 4),
                                "achieved_gflops": float(f"{flops * batch / seconds / 1e9:.4g}"),
                                "epochs": epochs.count(phase)}
    # training throughput over a whole schedule: time per image weighted by each phase's epochs
    s_per_img = sum(p["epochs"] / p["images_per_s"] for p in out["phases"].values()) / len(epochs)
    flops_img = sum(p["epochs"] * p["gflops_per_image"] for p in out["phases"].values()) / len(epochs)
    out["train_images_per_s"] = round(1 / s_per_img, 2)
    out["train_gflops_per_image"] = round(flops_img, 4)
    out["train_achieved_gflops"] = float(f"{flops_img / s_per_img:.4g}")  # tiny models too
    out["peak_rss_train_mb"] = round(peak_rss_mb(), 1)
    if device.type == "cuda":
        out["cuda_peak_train_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)

    if score_batch:
        detector.eval()
        xs = _batch(data, score_batch, device).contiguous(memory_format=fmt)

        def score():  # every score of the model, as the score stage computes them
            with autocast(device):
                score_all(detector, xs, params.score)
        score()  # warm-up
        _sync(device)
        if count_score_flops:
            out["score_gflops_per_image"] = round(count_flops(score, 1) / score_batch / 1e9, 4)
        times = []
        tic = time.perf_counter()
        while not times or time.perf_counter() - tic < score_seconds:
            t = time.perf_counter()
            score()
            _sync(device)
            times.append(time.perf_counter() - t)
        seconds = float(np.median(times))
        out["score_batch"] = score_batch
        out["score_images_per_s"] = round(score_batch / seconds, 2)
        if model == "anogan":
            out["search_steps"] = params.score.anogan.search_steps
    out["peak_rss_mb"] = round(peak_rss_mb(), 1)
    if device.type == "cuda":
        out["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    out["load_after"] = load()
    return out


def data_wait_job(data: str, model: str, size: int, base: int, batch: int, device_name: str,
                  epochs: int = 2, prefetch: int = 2, data_224: str | None = None) -> dict:
    """Share of the training loop's time spent waiting for batches (the loop of
    ``sparsegan.train.train_model``: ``iterate_batches`` over the memmap, shuffled)."""
    import torch

    from sparsegan.data.dataset import iterate_batches
    from sparsegan.checkpoint import resolve_device
    from sparsegan.train import data_prefetch, setup_detector, train_step
    device = resolve_device(device_name)
    images = np.load(data, mmap_mode="r")
    detector = setup_detector(model, 0, _params(size, base, batch, device.type), size, device)
    phase = detector.phases()[0]
    generator = torch.Generator().manual_seed(0)
    out: dict = {"model": model, "size": size, "batch": batch, "images": len(images),
                 "load_before": load(), "training_uses": f"prefetch_{data_prefetch(device)}"}
    for pf in sorted({0, prefetch, data_prefetch(device)}):
        waited = total = 0.0
        steps = 0
        for _ in range(epochs):
            tic = time.perf_counter()
            batches = iterate_batches(images, batch, shuffle=True, generator=generator,
                                      device=device, pin_memory=device.type == "cuda",
                                      prefetch=pf)
            while True:
                w = time.perf_counter()
                x = next(batches, None)
                waited += time.perf_counter() - w
                if x is None:
                    break
                train_step(detector, x, phase, device)
                steps += 1
            _sync(device)
            total += time.perf_counter() - tic
        out[f"prefetch_{pf}"] = {"data_wait_share": round(waited / total, 4),
                                 "ms_per_batch_waited": round(1e3 * waited / steps, 3),
                                 "step_ms": round(1e3 * total / steps, 2)}
    if data_224:  # producing one paper-size batch, against a GPU step's time
        images = np.load(data_224, mmap_mode="r")
        big = min(32, len(images))
        it = lambda: list(iterate_batches(images, big, shuffle=True, generator=generator,  # noqa: E731
                                          drop_last=True, device=device,
                                          pin_memory=device.type == "cuda"))
        it()
        n = len(images) // big
        seconds = _timed(it, device, 0.5, min_reps=2)
        out["batch_224x32_ms"] = round(1e3 * seconds / n, 3)
    out["load_after"] = load()
    return out


def _in_fresh_process(fn, **kwargs) -> dict:
    """``fn(**kwargs)`` in a new (spawned) Python process, so that its peak memory is its own."""
    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn"),
                             max_tasks_per_child=1) as pool:
        return pool.submit(fn, **kwargs).result()


def _in_this_process(fn, **kwargs) -> dict:
    return fn(**kwargs)


def _logged(run):
    """``run`` that reports each job's wall time on stderr."""
    def wrapper(fn, **kwargs) -> dict:
        tic, c = time.perf_counter(), Contention()
        out = run(fn, **kwargs)
        out["others_cores"] = c.others_cores()
        print(f"[bench]   {time.perf_counter() - tic:.1f} s (other processes: "
              f"{out['others_cores']:.2f} cores)", file=sys.stderr)
        return out
    return wrapper


# ---------------------------------------------------------------------------------- pipeline

def bench_pipeline(lambda_sp: float = 25.0) -> dict:
    """A full default ``dvc repro`` in a temporary copy of the repository (tracked and untracked
    non-ignored files), then ``dvc exp run -S train.lambda_sp=...``: the seconds of both."""
    venv_bin = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["PATH"] = f"{venv_bin}{os.pathsep}{env.get('PATH', '')}"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        repo = Path(tmp) / "repo"
        for f in filter(None, files):
            src = ROOT / f
            if src.is_file() and not f.startswith(("reports/", "docs/")):
                (repo / f).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, repo / f)
        env["MLFLOW_TRACKING_URI"] = f"sqlite:///{Path(tmp) / 'mlflow.db'}"

        cpu: dict[str, float] = {}

        def sh(*cmd: str) -> float:
            tic, used = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
            proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
            if proc.returncode:
                raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                                   f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
            now = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu[cmd[1]] = (now.ru_utime - used.ru_utime) + (now.ru_stime - used.ru_stime)
            return time.perf_counter() - tic

        sh("git", "init", "-q")
        sh("git", "config", "user.email", "bench@example.invalid")
        sh("git", "config", "user.name", "bench")
        if not (repo / ".dvc" / "config").exists():
            sh("dvc", "init", "-q")
        sh("git", "add", "-A")
        sh("git", "commit", "-qm", "bench")
        load_before = load()
        full = sh("dvc", "repro")
        sh("git", "add", "-A")
        sh("git", "commit", "-qm", "repro")
        load_mid = load()
        exp = sh("dvc", "exp", "run", "-S", f"train.lambda_sp={lambda_sp}")
    return {"full_repro_s": round(full, 1), "exp_run_s": round(exp, 1),
            "full_repro_cpu_s": round(cpu["repro"], 1), "exp_run_cpu_s": round(cpu["exp"], 1),
            "cpu_ratio": round(cpu["exp"] / cpu["repro"], 3),
            "exp_run": f"dvc exp run -S train.lambda_sp={lambda_sp:g}",
            "ratio": round(exp / full, 3), "target_ratio": round(1 / 3, 3),
            "load_before": load_before, "load_between": load_mid, "load_after": load()}


def _run_pipeline(r: dict) -> None:
    """``r["pipeline"]``: :func:`bench_pipeline` with a lambda_sp other than params.yaml's."""
    from sparsegan.params import load_params
    lambda_sp = 25.0 if load_params(ROOT / "params.yaml").train.lambda_sp == 50 else 50.0
    print(f"[bench] pipeline: full dvc repro, then dvc exp run -S train.lambda_sp={lambda_sp:g}"
          f" ...", file=sys.stderr)
    c = Contention()
    r["pipeline"] = bench_pipeline(lambda_sp)
    r["pipeline"]["others_cores"] = c.others_cores()
    r["pipeline"]["reliable"] = r["pipeline"]["others_cores"] <= BUSY_LIMIT


# ------------------------------------------------------------------------------------ report

def markdown(r: dict) -> str:
    pk = r["peak"]
    # the peak is the best rate measured (matmul or conv): a share of it never exceeds 100%
    peak = max(pk["matmul_fp32_gflops"], pk["conv_fp32_gflops"])
    peak_name = "matmul" if peak == pk["matmul_fp32_gflops"] else "conv"
    pre = r["preprocess"]
    lines = [
        f"Machine: {r['machine']['summary']}; other processes kept "
        f"{r['machine']['others_cores']:.2f} cores busy on average during the run (at most "
        f"{r['machine']['max_others_cores']:.2f} during a measurement).",
        "",
        "| measure | result | target |",
        "|---|---|---|",
        f"| preprocess 512x496 JPEG -> 224 (draft decoding, {pre['workers']} processes) vs the "
        f"plain PIL loop | **{pre['speedup_vs_plain']}x** (draft alone, one core: "
        f"{pre['draft_speedup_1core']}x) | >= 2x |",
    ]
    sg = r["train"]["default"]["models"].get("sparse_gan")
    if sg:
        lines.append(f"| sparse_gan training on {r['machine']['device']} at the default size, "
                     f"counted FLOP/s / best measured fp32 rate ({peak_name}) | "
                     f"**{sg['train_achieved_gflops'] / peak:.0%}** | >= 70% |")
    dw = r.get("data_wait")
    if dw:
        used = dw.get("training_uses", "prefetch_0")
        other = [k for k in dw if k.startswith("prefetch_") and k != used]
        alt = (f" ({other[0].replace('_', ' ')} thread: {dw[other[0]]['data_wait_share']:.1%})"
               if other else "")
        lines.append(f"| time waiting for data, share of a training step (default size, "
                     f"{used.replace('_', ' ')} as training uses it) | "
                     f"**{dw[used]['data_wait_share']:.1%}**{alt} | < 5% |")
    pipe = r.get("pipeline")
    if pipe:
        busy = "" if pipe.get("reliable", True) else " (other jobs were running)"
        lines.append(f"| `{pipe['exp_run']}` after a full run / the full default `dvc repro` "
                     f"({pipe['full_repro_s'] / 60:.1f} min) | **{pipe['ratio']:.2f}**{busy} "
                     f"| <= 0.33 |")
    for name, title in (("default", "default size"), ("paper", "paper size")):
        t = r["train"].get(name)
        if not t:
            continue
        lines += ["", f"Per model, {title} ({t['size']}x{t['size']}, base width "
                      f"{t['base_channels']}, training batch {t['batch']}); FLOP/s as a share of "
                      f"the best measured fp32 rate ({peak_name}, {peak:.0f} GFLOP/s):", "",
                  "| model | GFLOP/image (train step) | train FLOP/s / best fp32 rate | "
                  "train img/s | inference img/s | inference / train speed | peak memory MB |",
                  "|---|---|---|---|---|---|---|"]
        for v, d in t["models"].items():
            inf = d.get("score_images_per_s")
            mem = d.get("cuda_peak_mb", d.get("peak_rss_mb"))
            frac = f"{d['train_achieved_gflops'] / peak:.0%}"
            speed = (f"{inf:.3g} | {inf / d['train_images_per_s']:.2g}x" if inf else "- | -")
            lines.append(f"| {v} | {d['train_gflops_per_image']:.3g} | {frac} | "
                         f"{d['train_images_per_s']:.3g} | {speed} | {mem:.0f} |")
    ab = r.get("ablations")
    if ab and "all_measures" in ab:
        base = ab["all_measures"]
        lines += ["", "sparse_gan training speed at the default size with one measure undone "
                      "(relative to all measures on):", ""]
        lines += [f"- {k}: {v / base:.2f}x" for k, v in ab.items() if k != "all_measures"]
    return "\n".join(lines)


def machine_info(device: str) -> dict:
    import torch
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "device": device,
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    info["summary"] = (f"{info.get('gpu', cpu)}, {info['cores']} cores, torch {torch.__version__}"
                       f" ({info['torch_threads']} threads)")
    return info


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "reports" / "bench.json"))
    ap.add_argument("--pipeline", action="store_true",
                    help="also time a full dvc repro and a dvc exp run after it (long)")
    ap.add_argument("--compile", action="store_true",
                    help="also time sparse_gan with train.compile (torch.compile)")
    ap.add_argument("--pipeline-only", action="store_true",
                    help="time only the pipeline (as --pipeline) and update it in --out")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    ap.add_argument("--no-isolate", action="store_true",
                    help="run the per-model jobs in this process (peak memory is then shared)")
    args = ap.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")
    if args.pipeline_only:
        out = Path(args.out)
        r = json.loads(out.read_text())
        _run_pipeline(r)
        r["markdown"] = markdown(r)
        out.write_text(json.dumps(r, indent=1) + "\n")
        print(r["markdown"])
        return r

    import torch

    from sparsegan.params import load_params
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    defaults = load_params(ROOT / "params.yaml")
    quick = args.quick
    run = _logged(_in_this_process if args.no_isolate else _in_fresh_process)
    r: dict = {"machine": machine_info(device)}
    r["machine"]["load_before"] = load()
    whole = Contention()
    t0 = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        tmp = Path(tmp)
        # 2,048 distinct scans: enough that the pool's fixed costs weigh as little as in a real
        # run (50,000 scans), a multiple of 32-image chunks so that both workers stay busy.
        # First, before torch has started its OpenMP threads in this process (the pools fork it).
        n_jpeg = 16 if quick else 2048
        print(f"[bench] preprocess: {n_jpeg} synthetic 512x496 JPEGs -> 224 ...", file=sys.stderr)
        paths = make_jpegs(tmp / "jpeg", n_jpeg)
        c = Contention()
        r["preprocess"] = bench_preprocess(paths, 224, tmp / "processed",
                                           defaults.preprocess.workers, repeats=1 if quick else 2)
        r["preprocess"].update(load=load(), others_cores=c.others_cores())
        data224 = str(tmp / "processed" / "bench.npy")

        print(f"[bench] peak rates ({device}) ...", file=sys.stderr)
        c = Contention()
        size_kw = dict(n=512, seconds=0.2, conv_batch=4) if quick else {}
        r["peak"] = peak_rates(device, **size_kw)
        if not cuda:
            one = peak_rates(device, threads=1, **size_kw)
            r["peak"]["matmul_fp32_gflops_1thread"] = one["matmul_fp32_gflops"]
            r["peak"]["conv_fp32_gflops_1thread"] = one["conv_fp32_gflops"]
        r["peak"].update(load=load(), others_cores=c.others_cores())

        sizes = {"default": (defaults.data.image_size, defaults.model.base_channels,
                             defaults.train.batch_size),
                 "paper": (224, 64, 32 if cuda else 8)}
        if quick:
            sizes = {"default": (32, 4, 8), "paper": (64, 8, 4)}
        data = {}
        arr = np.load(data224, mmap_mode="r")[:512]
        for name, (size, _, _) in sizes.items():
            from PIL import Image
            small = np.stack([np.asarray(Image.fromarray(np.asarray(a[0])).resize(
                (size, size), Image.Resampling.BILINEAR)) for a in arr])[:, None]
            data[name] = str(tmp / f"bench{size}.npy")
            np.save(data[name], small)

        r["train"] = {}
        for name, (size, base, batch) in sizes.items():
            r["train"][name] = {"size": size, "base_channels": base, "batch": batch,
                                "models": {}}
            for v in MODELS:
                print(f"[bench] {v} at {size}x{size}, base {base}, batch {batch} ...",
                      file=sys.stderr)
                paper = name == "paper"
                r["train"][name]["models"][v] = run(
                    model_job, model=v, size=size, base=base, batch=batch, data=data[name],
                    device_name=device, train_seconds=0.5 if quick else (1.0 if paper else 3.0),
                    train_min_steps=3 if paper else 5,
                    score_batch=(batch if not paper else (32 if cuda else 4)),
                    score_seconds=0.2 if quick else (0.5 if paper else 2.0),
                    count_score_flops=not (paper and v == "anogan"))
        size, base, batch = sizes["default"]
        print("[bench] data wait ...", file=sys.stderr)
        r["data_wait"] = run(data_wait_job, data=data["default"], model="sparse_gan",
                             size=size, base=base, batch=batch, device_name=device,
                             epochs=1 if quick else 3, data_224=data224)
        print("[bench] ablations ...", file=sys.stderr)
        common = dict(model="sparse_gan", size=size, base=base, batch=batch,
                      data=data["default"], device_name=device,
                      train_seconds=0.5 if quick else 3.0, train_min_steps=5, score_batch=0)
        ab = {"all_measures": r["train"]["default"]["models"]["sparse_gan"]}
        if not cuda:
            ab["nchw_instead_of_channels_last"] = run(model_job, **common, channels_last=False)
            ab["d_weight_grads_in_g_step"] = run(model_job, **common, freeze_d=False)
            ab["one_thread"] = run(model_job, **common, threads=1)
        if args.compile:
            ab["torch_compile"] = run(model_job, **common, compile=True)
        r["ablation_details"] = {k: {key: v[key] for key in (
            "train_images_per_s", "train_achieved_gflops", "threads", "load_before",
            "load_after", "others_cores") if key in v} for k, v in ab.items()}
        r["ablations"] = {k: v["train_images_per_s"] for k, v in ab.items()}
    r["machine"]["others_cores"] = whole.others_cores()

    if args.pipeline:
        _run_pipeline(r)
    r["machine"]["load_after"] = load()
    r["machine"]["bench_seconds"] = round(time.perf_counter() - t0, 1)
    busy = [r["machine"]["others_cores"]] + [
        d.get("others_cores", 0) for t in r["train"].values() for d in t["models"].values()]
    r["machine"]["max_others_cores"] = max(busy)
    r["machine"]["reliable"] = bool(cuda or max(busy) <= BUSY_LIMIT)
    r["markdown"] = markdown(r)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(r, indent=1) + "\n")
    print(r["markdown"])
    if not r["machine"]["reliable"]:
        print(f"\n[bench] warning: other processes used up to {max(busy):.2f} cores during a "
              f"measurement: CPU timings are unreliable (two OpenMP threads on two busy cores "
              f"wait for each other); re-run on a quiet machine", file=sys.stderr)
    print(f"\n[bench] wrote {out} in {r['machine']['bench_seconds']:.0f} s", file=sys.stderr)
    return r


if __name__ == "__main__":
    main()
