"""Stage train@<variant>: train one variant of Table 1 on the normal training scans.

With ``train.nproc_per_node: N`` > 1 the stage re-launches itself under
``python -m torch.distributed.run --standalone --nproc_per_node N`` (one process per GPU on CUDA,
gloo processes on CPU) unless it already runs under torchrun; see ``sparsegan/distributed.py``.
"""

import os
import sys
from pathlib import Path

import torch

from sparsegan import distributed
from sparsegan.cli import StageError, run_stage
from sparsegan.params import check_variant, load_params
from sparsegan.train import resolve_device, train_variant


def main(variant: str) -> None:
    check_variant(variant)
    params = load_params()
    nproc = params.train.nproc_per_node
    if nproc > 1 and not distributed.under_torchrun():
        device = resolve_device(params.train.device)
        if device.type == "cuda" and torch.cuda.device_count() < nproc:
            raise StageError(f"train.nproc_per_node = {nproc} but only "
                             f"{torch.cuda.device_count()} CUDA devices are visible; lower it")
        code = distributed.relaunch(os.path.abspath(__file__), [variant], nproc, device.type)
        if code:
            print(f"error: train@{variant} under torchrun ({nproc} processes) failed with exit "
                  f"code {code}; see the messages above", file=sys.stderr)
            sys.exit(code if 0 < code < 256 else 1)
        return
    train_variant(variant, params, Path("data/processed"), Path("models") / variant,
                  Path("checkpoints") / variant)


if __name__ == "__main__":
    run_stage(main, *sys.argv[1:])
