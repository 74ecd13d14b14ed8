"""Read the preprocessed arrays (``data/processed/<name>.npy``, uint8 ``[N, 1, S, S]``).

Arrays are opened memory-mapped (``np.load(mmap_mode="r")``), so a split never has to fit in RAM.
Images become float tensors in [-1, 1] (``x / 127.5 - 1``), the generator's Tanh range.

Two ways to read:

* :func:`iterate_batches`: whole batches by one contiguous slice (no shuffle) or one sorted
  fancy index (shuffle) of the memmap, converted in one go; no per-image Python overhead. The
  training loop uses it.
* :class:`ArrayDataset`: a ``torch.utils.data.Dataset`` for code that wants a ``DataLoader``
  (e.g. with ``DistributedSampler``). It opens the memmap lazily in each worker process, so that
  pickling the dataset to a worker never copies the array.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset


def to_float(x: np.ndarray | torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """uint8 images -> float32 tensor in [-1, 1]; moved to ``device`` as uint8 first (4x less)."""
    if isinstance(x, np.ndarray):
        if not (x.flags.writeable and x.flags.c_contiguous) or isinstance(x, np.memmap):
            x = np.array(x, order="C")  # read the mapped pages into RAM once
        x = torch.from_numpy(x)
    t = x
    if device is not None:
        t = t.to(device, non_blocking=True)
    return t.float().div_(127.5).sub_(1.0)


def load_split(processed_dir: Path, name: str) -> tuple[np.ndarray, pd.DataFrame, np.ndarray | None]:
    """``(images memmap [N,1,S,S] uint8, index frame (the rows of <name>.csv), masks or None)``."""
    processed_dir = Path(processed_dir)
    images = np.load(processed_dir / f"{name}.npy", mmap_mode="r")
    index = pd.read_csv(processed_dir / f"{name}.csv", dtype={"patient": str, "mask": str},
                        keep_default_na=False)
    if len(index) != len(images):
        raise ValueError(f"{processed_dir}/{name}.csv has {len(index)} rows but {name}.npy has "
                         f"{len(images)} images; re-run the preprocess stage")
    mask_file = processed_dir / f"{name}_masks.npy"
    masks = np.load(mask_file, mmap_mode="r") if mask_file.exists() else None
    if masks is not None and masks.shape != images.shape:
        raise ValueError(f"{mask_file}: shape {masks.shape} differs from the images' "
                         f"{images.shape}; re-run the preprocess stage")
    return images, index, masks


def iterate_batches(images: np.ndarray, batch_size: int, shuffle: bool = False,
                    generator: torch.Generator | None = None, drop_last: bool = False,
                    device: torch.device | str | None = None,
                    return_index: bool = False) -> Iterator[torch.Tensor | tuple[torch.Tensor, np.ndarray]]:
    """Yield float batches ``(B, 1, S, S)`` in [-1, 1] from a uint8 (memmapped) array.

    ``shuffle``: a random permutation (from ``generator``, for reproducibility); each batch's
    indices are sorted so that the memmap is read front to back. ``return_index``: also yield the
    batch's row indices (e.g. to look up labels). ``device``: move uint8 there, then convert.
    """
    n = len(images)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = torch.randperm(n, generator=generator).numpy() if shuffle else None
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        end = min(start + batch_size, n)
        if order is None:
            idx = np.arange(start, end)
            batch = images[start:end]
        else:
            idx = np.sort(order[start:end])
            batch = images[idx]
        x = to_float(batch, device)
        yield (x, idx) if return_index else x


class ArrayDataset(Dataset):
    """Images of one ``.npy`` as float tensors ``(1, S, S)`` in [-1, 1], optionally with labels.

    ``source``: the ``.npy`` path (opened memory-mapped on first use, in each process) or an
    array. ``labels``: one int per image, or None; with labels an item is ``(image, label)``.
    """

    def __init__(self, source: str | Path | np.ndarray, labels: np.ndarray | list | None = None):
        if isinstance(source, np.ndarray):
            self._path, self._images = None, source
            n = len(source)
        else:
            self._path, self._images = Path(source), None
            n = len(np.load(self._path, mmap_mode="r"))
        self._len = n
        self.labels = None if labels is None else torch.tensor(np.asarray(labels), dtype=torch.long)
        if self.labels is not None and len(self.labels) != n:
            raise ValueError(f"{len(self.labels)} labels for {n} images")

    @classmethod
    def from_split(cls, processed_dir: Path, name: str, with_labels: bool = False) -> ArrayDataset:
        """``<processed_dir>/<name>.npy``, with the ``label`` column of ``<name>.csv`` if asked."""
        processed_dir = Path(processed_dir)
        labels = None
        if with_labels:
            labels = pd.read_csv(processed_dir / f"{name}.csv", usecols=["label"])["label"].to_numpy()
        return cls(processed_dir / f"{name}.npy", labels)

    @property
    def images(self) -> np.ndarray:
        if self._images is None:
            self._images = np.load(self._path, mmap_mode="r")
        return self._images

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        x = to_float(self.images[i])
        return x if self.labels is None else (x, self.labels[i])

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        if self._path is not None:
            state["_images"] = None  # reopen in the worker; never pickle the mapped data
        return state
