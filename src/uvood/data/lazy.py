"""Data read and converted slice by slice, so that memory does not grow with the number of images.

* :func:`open_npz`: the arrays of an ``.npz``, read slice by slice from the file where they are
  stored uncompressed (``np.savez``; :class:`StoredArray`), loaded otherwise. Slices are read with
  ``readinto``, not memory-mapped: mapped pages count in the process's resident memory.
* :class:`LazyImages`: ``fn(source[lo:hi])`` on demand, e.g. uint8 images of a memory-mapped
  file converted to the model's input format batch by batch (:func:`uvood.batching.iter_batches`
  slices it like a tensor, :mod:`uvood.distributed` shards it like one).
* :class:`Decoded`: the images of a folder or a JPEG archive, decoded one slice at a time (the
  source of a :class:`LazyImages` in ``uvood score``).
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..errors import UvoodError


class StoredArray:
    """A C-ordered array stored at ``offset`` in the file ``path``; ``a[lo:hi]`` reads those rows only."""

    def __init__(self, path: Path, offset: int, shape: tuple[int, ...], dtype: np.dtype):
        self.path, self.offset, self.shape, self.dtype = path, offset, tuple(shape), dtype
        self.ndim = len(self.shape)
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> np.ndarray:
        if isinstance(index, slice) and index.step in (None, 1):
            lo, hi, _ = index.indices(self.shape[0])
            hi = max(lo, hi)
            out = np.empty((hi - lo, *self.shape[1:]), self.dtype)
            with open(self.path, "rb", buffering=0) as f:
                f.seek(self.offset + lo * self.row_bytes)
                got = f.readinto(memoryview(out).cast("B"))
            if got != out.nbytes:
                raise UvoodError(f"{self.path} ends before the rows {lo}:{hi} it declares: the file is truncated. "
                                 "Copy or write it again.")
            return out
        return np.asarray(self)[index]

    def __array__(self, dtype=None, copy=None):
        a = self[0:self.shape[0]]
        return a if dtype is None else a.astype(dtype)


def open_npz(path) -> dict[str, np.ndarray | StoredArray]:
    """Every array of the ``.npz`` at ``path``: a :class:`StoredArray` (read on demand) for a member stored
    uncompressed in C order, a loaded array otherwise (compressed members, ``np.savez_compressed``)."""
    path = Path(path)
    out: dict[str, np.ndarray] = {}
    try:
        with zipfile.ZipFile(path) as zf, open(path, "rb") as raw:
            for info in zf.infolist():
                name = info.filename.removesuffix(".npy")
                if info.compress_type != zipfile.ZIP_STORED:
                    with zf.open(info) as f:
                        out[name] = np.lib.format.read_array(f, allow_pickle=False)
                    continue
                raw.seek(info.header_offset)
                local = raw.read(30)  # the local file header: its name and extra field lengths are at 26..30
                start = info.header_offset + 30 + int.from_bytes(local[26:28], "little") \
                    + int.from_bytes(local[28:30], "little")
                raw.seek(start)
                version = np.lib.format.read_magic(raw)
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                    np.lib.format.read_array_header_2_0
                shape, fortran, dtype = read_header(raw)
                if dtype.hasobject:
                    raise ValueError(f"member {name} holds Python objects")
                if fortran or len(shape) == 0:
                    raw.seek(start)
                    out[name] = np.lib.format.read_array(raw, allow_pickle=False)
                else:
                    out[name] = StoredArray(path, raw.tell(), shape, dtype)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise UvoodError(f"cannot read {path} as .npz ({type(e).__name__}: {e}). The file is truncated or "
                         "corrupt: delete it and copy or write it again.") from None
    return out


class LazyImages:
    """``fn(source[lo:hi])`` for any slice, computed when asked for; ``len`` and ``shape[0]`` as ``source``
    (or as the range ``start:stop`` of it that :meth:`sub` keeps: a sub-range reads nothing until sliced)."""

    def __init__(self, source, fn: Callable[[object], object], start: int = 0, stop: int | None = None):
        self.source, self.fn = source, fn
        self.start, self.stop = start, len(source) if stop is None else stop

    def __len__(self) -> int:
        return self.stop - self.start

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self),)

    def _bounds(self, lo: int, hi: int) -> tuple[int, int]:
        lo, hi = max(0, min(lo, len(self))), max(0, min(hi, len(self)))
        return self.start + lo, self.start + max(lo, hi)

    def slice(self, lo: int, hi: int):
        """The converted samples ``lo:hi`` (a tensor): only these are read (and decoded)."""
        a, b = self._bounds(lo, hi)
        return self.fn(self.source[a:b])

    def sub(self, lo: int, hi: int) -> LazyImages:
        """Samples ``lo:hi``, still unread."""
        return LazyImages(self.source, self.fn, *self._bounds(lo, hi))


class Decoded:
    """Images ``0..n-1`` that ``read(i)`` decodes (uint8 H x W x C arrays, any sizes): ``images[lo:hi]`` decodes
    those only, so a folder of image files or a JPEG archive is held decoded one batch at a time."""

    def __init__(self, read: Callable[[int], np.ndarray], n: int):
        self.read, self.n = read, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: slice) -> list[np.ndarray]:
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError("Decoded images are read by contiguous slices, images[lo:hi]")
        lo, hi, _ = index.indices(self.n)
        return [self.read(i) for i in range(lo, hi)]
