"""Stage train_<model>@<seed>: train one model of Table 1 from one seed on the normal training scans.

With ``runtime.nproc_per_node: N`` > 1 the stage re-launches itself under
``python -m torch.distributed.run --standalone --nproc_per_node N`` (one process per GPU on CUDA,
gloo processes on CPU) unless it already runs under torchrun; see ``sparsegan/distributed.py``.
"""

import os
import sys
from pathlib import Path

import torch

# this checkout's package, not an installed one: `dvc exp run --temp` runs a copy of the repo
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparsegan import distributed, layout
from sparsegan.cli import StageError, run_stage
from sparsegan.params import check_model, check_seed, load_params
from sparsegan.checkpoint import resolve_device
from sparsegan.train import train_model


def main(model: str, seed: str) -> None:
    check_model(model)
    seed_value = check_seed(seed)
    params = load_params()
    nproc = params.runtime.nproc_per_node
    if nproc > 1 and not distributed.under_torchrun():
        device = resolve_device(params.runtime.device)
        if device.type == "cuda" and torch.cuda.device_count() < nproc:
            raise StageError(f"runtime.nproc_per_node = {nproc} but only "
                             f"{torch.cuda.device_count()} CUDA devices are visible; lower it")
        code = distributed.relaunch(os.path.abspath(__file__), [model, seed], nproc, device.type)
        if code:
            print(f"error: train_{model}@{seed} under torchrun ({nproc} processes) failed with exit "
                  f"code {code}; see the messages above", file=sys.stderr)
            sys.exit(code if 0 < code < 256 else 1)
        return
    where = layout.seed_dir(model, seed_value)
    train_model(model, seed_value, params,
                layout.processed_dir(params.preprocess.variant_of(model)), layout.MODELS / where,
                layout.CHECKPOINTS / where, run_file=layout.run_file("train", model, seed_value))


if __name__ == "__main__":
    run_stage(main, *sys.argv[1:])
