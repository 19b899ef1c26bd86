"""Turn the inputs users have (tensor, numpy array, DataLoader, iterable of batches) into batches."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch

from .errors import UvoodError
from .validation import as_tensor


def _split_batch(batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise UvoodError("The data loader yielded an empty batch.")
        x = as_tensor(batch[0], "batch input")
        y = as_tensor(batch[1], "batch labels") if len(batch) > 1 and batch[1] is not None else None
        return x, y
    if isinstance(batch, dict):
        key = next((k for k in ("x", "image", "images", "input") if k in batch), None)
        if key is None:
            raise UvoodError(f"A dict batch needs an 'x' or 'image' entry, got keys {sorted(batch)}.")
        y = batch.get("y", batch.get("label"))
        return as_tensor(batch[key], "batch input"), None if y is None else as_tensor(y, "batch labels")
    return as_tensor(batch, "batch input"), None


def _lazy(data) -> bool:
    from .data.lazy import LazyImages

    return isinstance(data, LazyImages)


def data_length(data) -> int | None:
    if isinstance(data, (torch.Tensor, np.ndarray)) or _lazy(data):
        return int(data.shape[0])
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], (torch.Tensor, np.ndarray)):
        return int(data[0].shape[0])
    try:
        dataset = getattr(data, "dataset", None)
        return len(dataset) if dataset is not None else None
    except TypeError:
        return None


def is_sliceable(data) -> bool:
    """True for data cut into batches by slicing (a tensor or array, or an ``(x, y)`` pair of them)."""
    if isinstance(data, (torch.Tensor, np.ndarray)) or _lazy(data):
        return True
    return isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], (torch.Tensor, np.ndarray))


def slice_data(data, lo: int, hi: int):
    """Samples ``lo:hi`` of sliceable data (:func:`is_sliceable`), in the same form (views, no copy)."""
    if _lazy(data):
        return data.sub(lo, hi)
    if isinstance(data, (torch.Tensor, np.ndarray)):
        return data[lo:hi]
    return data[0][lo:hi], data[1][lo:hi]


def iter_batches(data, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Yield ``(x, y_or_None)`` batches from a tensor/array, an ``(x, y)`` pair or an iterable.

    Tensors, arrays (memory-mapped ones are read one slice at a time) and
    :class:`uvood.data.lazy.LazyImages` are cut into ``batch_size`` slices; an iterable (e.g. a
    DataLoader) is used as it batches itself.
    """
    if batch_size < 1:
        raise UvoodError(f"batch_size must be >= 1, got {batch_size}.")
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], (torch.Tensor, np.ndarray)):
        x, y = as_tensor(data[0], "x"), as_tensor(data[1], "y")
        if y.shape[0] != x.shape[0]:
            raise UvoodError(f"x has {x.shape[0]} samples but y has {y.shape[0]}.")
        for i in range(0, x.shape[0], batch_size):
            yield x[i:i + batch_size], y[i:i + batch_size]
        return
    if _lazy(data):  # read and converted one batch at a time
        for i in range(0, len(data), batch_size):
            yield as_tensor(data.slice(i, i + batch_size), "x"), None
        return
    if isinstance(data, (torch.Tensor, np.ndarray)):
        x = as_tensor(data, "x")
        for i in range(0, x.shape[0], batch_size):
            yield x[i:i + batch_size], None
        return
    if isinstance(data, Iterable):
        for batch in data:
            yield _split_batch(batch)
        return
    raise UvoodError(f"Cannot read data of type {type(data).__name__}: pass a tensor N x C x H x W, "
                     "an (x, y) pair or a DataLoader.")
