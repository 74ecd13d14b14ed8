"""Read the preprocessed arrays (``data/processed/<name>.npy``, uint8 ``[N, 1, S, S]``).

Arrays are opened memory-mapped (``np.load(mmap_mode="r")``), so a split never has to fit in RAM.
Images become float tensors in [-1, 1] (``x / 127.5 - 1``), the generator's Tanh range.

Two ways to read:

* :func:`iterate_batches`: whole batches by one contiguous slice (no shuffle) or one sorted
  gather (shuffle) of the memmap into one uint8 buffer (page-locked for a GPU), optionally
  prefetched in a background thread, converted to float on the target device in one go; no
  per-image Python overhead. The training loop uses it (also sharded per rank under torchrun).
* :class:`ArrayDataset`: a ``torch.utils.data.Dataset`` for code that wants a ``DataLoader``
  (e.g. with ``DistributedSampler``). It opens the memmap lazily in each worker process, so that
  pickling the dataset to a worker never copies the array.
"""

from __future__ import annotations

import queue
import threading
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


def require(path: Path) -> Path:
    """``path`` if it exists, else FileNotFoundError in one line saying what makes it."""
    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: not found; the preprocess stage writes it "
                                f"(`dvc repro preprocess`)")
    return Path(path)


def load_split(processed_dir: Path, name: str) -> tuple[np.ndarray, pd.DataFrame, np.ndarray | None]:
    """``(images memmap [N,1,S,S] uint8, index frame (the rows of <name>.csv), masks or None)``."""
    processed_dir = Path(processed_dir)
    images = np.load(require(processed_dir / f"{name}.npy"), mmap_mode="r")
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


def shard(order: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """This rank's part of ``order`` (an epoch's indices), as ``DistributedSampler`` with
    ``drop_last=False``: pad to a multiple of ``world_size`` by repeating the start, then every
    ``world_size``-th index from ``rank``. All ranks get the same number of indices."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
    if world_size == 1:
        return order
    n = len(order)
    total = -(-n // world_size) * world_size
    if total > n:
        order = np.concatenate([order, np.resize(order, total - n)])
    return order[rank:total:world_size]


def iterate_batches(images: np.ndarray, batch_size: int, shuffle: bool = False,
                    generator: torch.Generator | None = None, drop_last: bool = False,
                    device: torch.device | str | None = None,
                    return_index: bool = False, rank: int = 0, world_size: int = 1,
                    pin_memory: bool = False, prefetch: int = 0,
                    ) -> Iterator[torch.Tensor | tuple[torch.Tensor, np.ndarray]]:
    """Yield float batches ``(B, 1, S, S)`` in [-1, 1] from a uint8 (memmapped) array.

    ``shuffle``: a random permutation (from ``generator``, for reproducibility); each batch's
    indices are sorted so that the memmap is read front to back. ``return_index``: also yield the
    batch's row indices (e.g. to look up labels). ``device``: move uint8 there, then convert.

    Distributed training: ``rank`` of ``world_size`` reads its shard of the order
    (:func:`shard`, as ``DistributedSampler``), in batches of
    ``batch_size`` (the per-rank batch); every rank must pass the same generator state.

    Speed: a batch is gathered from the memmap straight into one uint8 buffer (``np.take`` with
    ``out=``; ``pin_memory``: a page-locked buffer, so that the copy to the GPU is asynchronous)
    and converted to float on ``device``, where a quarter of the bytes travel. ``prefetch`` > 0
    gathers up to that many batches ahead in a background thread (numpy releases the GIL while it
    copies), so that the training step does not wait for page faults of the memmap.
    """
    n = len(images)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = torch.randperm(n, generator=generator).numpy() if shuffle else None
    if world_size > 1:
        order = shard(np.arange(n) if order is None else order, rank, world_size)
    m = n if order is None else len(order)
    stop = m - m % batch_size if drop_last else m
    pin = pin_memory and torch.cuda.is_available()

    def gather(start: int) -> tuple[torch.Tensor, np.ndarray]:
        end = min(start + batch_size, m)
        buf = torch.empty((end - start, *images.shape[1:]), dtype=torch.uint8, pin_memory=pin)
        out = buf.numpy()
        if order is None:
            idx = np.arange(start, end)
            out[...] = images[start:end]  # one contiguous read
        else:
            idx = np.sort(order[start:end])
            np.take(images, idx, axis=0, out=out)  # one sorted gather, no intermediate copy
        return buf, idx

    starts = range(0, stop, batch_size)
    batches = (_prefetched(gather, starts, prefetch) if prefetch > 0
               else (gather(s) for s in starts))
    for buf, idx in batches:
        x = to_float(buf, device)
        yield (x, idx) if return_index else x


class _Failed:
    def __init__(self, exc: BaseException):
        self.exc = exc


_DONE = object()


def _prefetched(make, starts, depth: int) -> Iterator:
    """``make(s)`` for each of ``starts``, computed up to ``depth`` items ahead in a thread.
    An exception in the thread is re-raised here; closing the generator stops the thread."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for s in starts:
                if not put(make(s)):
                    return
            put(_DONE)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            put(_Failed(exc))

    thread = threading.Thread(target=work, name="batch-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, _Failed):
                raise item.exc
            yield item
    finally:
        stop.set()
        thread.join()


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
            labels = pd.read_csv(require(processed_dir / f"{name}.csv"),
                                 usecols=["label"])["label"].to_numpy()
        return cls(require(processed_dir / f"{name}.npy"), labels)

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
