"""Stage train_<model>@<seed>: train one model of Table 1 from one seed on the normal training scans.

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
from sparsegan.params import check_model, check_seed, load_params
from sparsegan.train import resolve_device, train_model


def main(model: str, seed: str) -> None:
    check_model(model)
    seed_value = check_seed(seed)
    params = load_params()
    nproc = params.train.nproc_per_node
    if nproc > 1 and not distributed.under_torchrun():
        device = resolve_device(params.train.device)
        if device.type == "cuda" and torch.cuda.device_count() < nproc:
            raise StageError(f"train.nproc_per_node = {nproc} but only "
                             f"{torch.cuda.device_count()} CUDA devices are visible; lower it")
        code = distributed.relaunch(os.path.abspath(__file__), [model, seed], nproc, device.type)
        if code:
            print(f"error: train_{model}@{seed} under torchrun ({nproc} processes) failed with exit "
                  f"code {code}; see the messages above", file=sys.stderr)
            sys.exit(code if 0 < code < 256 else 1)
        return
    where = Path(model) / f"s{seed_value}"
    train_model(model, seed_value, params, Path("data/processed"), Path("models") / where,
                Path("checkpoints") / where)


if __name__ == "__main__":
    run_stage(main, *sys.argv[1:])
