"""File-format readers. Each returns plain numpy arrays and raises :class:`UvoodError` with
the problem and the fix on bad files (truncated or corrupt archives, wrong keys, wrong
image shape, labels out of range).

Conventions: images are uint8 N x H x W x C; labels int64, ``-1`` = unlabelled.

* decoded ``.npz``: ``x`` uint8 (N, H, W, C), ``y`` int64 (N,).
* JPEG ``.npz``: ``data`` uint8 (all JPEG files concatenated), ``offsets`` int64 (N + 1),
  ``y`` int64 (N,), ``names`` str (N,); image i is ``data[offsets[i]:offsets[i + 1]]``.
* official formats: SVHN ``*_32x32.mat`` (label 10 means digit 0), CIFAR-10 python
  batches (pickles, read with a restricted unpickler), MNIST idx files (raw or ``.gz``),
  ImageFolder (one sub-folder per class, sorted names = class indices).
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import UvoodError

CORRUPT_HELP = "The file is truncated or corrupt: delete it and copy or download it again."


def read_npz(path: str | os.PathLike, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """All arrays of an ``.npz`` (``allow_pickle=False``), checking that ``keys`` are present."""
    path = Path(path)
    if not path.is_file():
        raise UvoodError(f"file not found: {path}.")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError) as exc:
        raise UvoodError(f"cannot read {path} as .npz ({type(exc).__name__}: {exc}). {CORRUPT_HELP}") from None
    missing = [key for key in keys if key not in arrays]
    if missing:
        raise UvoodError(f"{path} lacks the keys {missing} (it has {sorted(arrays)}); expected an .npz with "
                         f"keys {list(keys)} -- is it the right file or format?")
    return arrays


def check_labels(y: np.ndarray, n: int, num_classes: int, where: str, allow_unlabelled: bool = False) -> np.ndarray:
    """Labels as int64 (n,), each in ``[0, num_classes)`` (or -1 when ``allow_unlabelled``)."""
    y = np.asarray(y)
    if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer):
        raise UvoodError(f"{where}: labels must be integers of shape ({n},), got {y.dtype} {y.shape}.")
    low = -1 if allow_unlabelled else 0
    bad = (y < low) | (y >= num_classes)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise UvoodError(f"{where}: label {int(y[i])} at index {i} is out of range [{low}, {num_classes - 1}] "
                         f"({int(bad.sum())} such labels); the file does not belong to this data set or is damaged.")
    return y.astype(np.int64, copy=False)


def check_images(x: np.ndarray, where: str, hwc: tuple[int | None, int | None, int | None] | None = None) -> np.ndarray:
    """uint8 N x H x W x C images, with (H, W, C) equal to ``hwc`` where given (None = any)."""
    if x.dtype != np.uint8 or x.ndim != 4:
        raise UvoodError(f"{where}: images must be uint8 of shape (N, H, W, C), got {x.dtype} {x.shape}.")
    if hwc is not None and any(e is not None and e != a for e, a in zip(hwc, x.shape[1:])):
        raise UvoodError(f"{where}: images have shape (H, W, C) = {x.shape[1:]}, expected {tuple(hwc)}; "
                         "the file belongs to another data set or was saved in another layout.")
    return x


def read_decoded_npz(path, num_classes: int, hwc=None) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` of a decoded ``.npz`` with checks of image shape and label range."""
    arrays = read_npz(path, ("x", "y"))
    x = check_images(arrays["x"], str(path), hwc)
    return x, check_labels(arrays["y"], len(x), num_classes, str(path))


class JpegArchive:
    """A JPEG ``.npz`` held as bytes; ``archive[i]`` decodes image i to uint8 H x W x 3."""

    def __init__(self, path, num_classes: int, allow_unlabelled: bool = False):
        arrays = read_npz(path, ("data", "offsets", "y", "names"))
        self.path = Path(path)
        self.data, self.offsets = arrays["data"], np.asarray(arrays["offsets"])
        self.names, self.extra = arrays["names"], {k: v for k, v in arrays.items()
                                                   if k not in ("data", "offsets", "y", "names")}
        n = len(self.offsets) - 1
        if (self.data.dtype != np.uint8 or self.data.ndim != 1 or self.offsets.ndim != 1 or n < 0
                or self.offsets[0] != 0 or self.offsets[-1] != len(self.data) or np.any(np.diff(self.offsets) <= 0)):
            raise UvoodError(f"{path}: 'offsets' must rise from 0 to len(data) = {len(self.data)} over N + 1 "
                             f"entries; got {len(self.offsets)} entries ending at "
                             f"{self.offsets[-1] if len(self.offsets) else None}. {CORRUPT_HELP}")
        self.y = check_labels(arrays["y"], n, num_classes, str(path), allow_unlabelled)

    def __len__(self) -> int:
        return len(self.y)

    def image(self, i: int) -> Image.Image:
        """Image i as an RGB PIL image."""
        raw = self.data[self.offsets[i]:self.offsets[i + 1]].tobytes()
        try:
            return Image.open(io.BytesIO(raw)).convert("RGB")
        except OSError as exc:
            raise UvoodError(f"{self.path}: image {i} ({self.names[i]}) is not a decodable JPEG ({exc}). "
                             f"{CORRUPT_HELP}") from None

    def __getitem__(self, i: int) -> np.ndarray:
        return np.asarray(self.image(int(i)))

    def decode(self, indices=None, hwc=None) -> np.ndarray:
        """Decode images ``indices`` (default all) into one uint8 N x H x W x 3 array of equal sizes."""
        indices = range(len(self)) if indices is None else indices
        images = [self[i] for i in indices]
        if not images:
            return np.zeros((0, *(hwc or (0, 0, 3))), np.uint8)
        shapes = {im.shape for im in images}
        if len(shapes) > 1:
            raise UvoodError(f"{self.path}: images differ in size ({sorted(shapes)[:3]}...); pass size= to resize.")
        return check_images(np.stack(images), str(self.path), hwc)


# ---------------------------------------------------------------- official formats


def read_svhn_mat(path) -> tuple[np.ndarray, np.ndarray]:
    """SVHN ``train_32x32.mat``/``test_32x32.mat``: ``X`` (32, 32, 3, N) -> NHWC, label 10 -> 0."""
    try:
        from scipy.io import loadmat
    except ImportError:
        raise UvoodError("reading SVHN .mat files needs scipy: pip install scipy (or pip install -e .[dev]).") from None
    path = Path(path)
    if not path.is_file():
        raise UvoodError(f"file not found: {path}.")
    try:
        mat = loadmat(path)
    except Exception as exc:  # scipy raises several types on damaged files
        raise UvoodError(f"cannot read {path} as a MATLAB file ({type(exc).__name__}: {exc}). {CORRUPT_HELP}") from None
    if "X" not in mat or "y" not in mat:
        raise UvoodError(f"{path} lacks the variables X and y of SVHN's *_32x32.mat format.")
    x = np.asarray(mat["X"])
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        raise UvoodError(f"{path}: X must be (32, 32, 3, N), got {x.shape}.")
    x = np.ascontiguousarray(x.transpose(3, 0, 1, 2)).astype(np.uint8, copy=False)
    y = np.asarray(mat["y"]).reshape(-1).astype(np.int64)
    y = check_labels(y, len(x), 11, str(path))
    if (y == 0).any():
        raise UvoodError(f"{path}: SVHN labels run 1..10 (10 = digit 0); found label 0.")
    y[y == 10] = 0
    return x, y


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler for CIFAR-10 batches: dicts of bytes, lists and numpy arrays, nothing else
    (``_codecs.encode`` only turns text back into bytes, as Python 3 protocol-2 pickles need)."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR-10 batch")


def read_cifar10_batch(path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch (``data_batch_1`` .. ``test_batch``): ``data`` (N, 3072) -> NHWC."""
    path = Path(path)
    if not path.is_file():
        raise UvoodError(f"file not found: {path}.")
    try:
        with open(path, "rb") as handle:
            batch = _CifarUnpickler(handle, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise UvoodError(f"cannot read {path} as a CIFAR-10 python batch ({type(exc).__name__}: {exc}). "
                         f"{CORRUPT_HELP}") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise UvoodError(f"{path} lacks the keys b'data' and b'labels' of a CIFAR-10 python batch.")
    data = np.asarray(batch[b"data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise UvoodError(f"{path}: data must be uint8 (N, 3072), got {data.dtype} {data.shape}.")
    x = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return x, check_labels(np.asarray(batch[b"labels"], dtype=np.int64), len(x), 10, str(path))


def read_cifar10_python(folder, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The official ``cifar-10-batches-py`` folder: train = data_batch_1..5, test = test_batch."""
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    parts = [read_cifar10_batch(Path(folder) / name) for name in names]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def read_idx(path) -> np.ndarray:
    """An MNIST idx file (raw or gzip): magic 0x0000 <type 0x08> <ndim>, big-endian int32 dims, data."""
    path = Path(path)
    if not path.is_file():
        raise UvoodError(f"file not found: {path}.")
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError) as exc:
        raise UvoodError(f"cannot read {path} ({type(exc).__name__}: {exc}). {CORRUPT_HELP}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise UvoodError(f"{path} is not an unsigned-byte idx file (magic {raw[:4].hex()}, expected 000008xx).")
    ndim = raw[3]
    dims = tuple(int(d) for d in np.frombuffer(raw, ">i4", count=ndim, offset=4))
    expected = int(np.prod(dims)) + 4 + 4 * ndim
    if len(raw) != expected:
        raise UvoodError(f"{path}: {len(raw)} bytes, expected {expected} for shape {dims}. {CORRUPT_HELP}")
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims).copy()


def read_mnist_idx(images_path, labels_path) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` from an idx image file (N, 28, 28) and label file (N,); x gets a channel axis."""
    x, y = read_idx(images_path), read_idx(labels_path)
    if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
        raise UvoodError(f"{images_path} / {labels_path}: expected images (N, H, W) and labels (N,), "
                         f"got {x.shape} and {y.shape}.")
    return x[..., None], check_labels(y.astype(np.int64), len(x), 10, str(labels_path))


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def list_image_folder(root) -> tuple[list[Path], list[int], list[str]]:
    """(image files, their labels, class names) of an ImageFolder ``root/<class>/<image>``,
    reading no image; classes are the sorted sub-folder names."""
    root = Path(root)
    if not root.is_dir():
        raise UvoodError(f"image folder not found: {root}; expected one sub-folder per class.")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise UvoodError(f"{root} has no class sub-folders; expected root/<class>/<image files>.")
    files, labels = [], []
    for label, name in enumerate(classes):
        for file in sorted((root / name).iterdir()):
            if file.suffix.lower() in IMAGE_SUFFIXES:
                files.append(file)
                labels.append(label)
    if not files:
        raise UvoodError(f"{root}: no image files ({sorted(IMAGE_SUFFIXES)}) in the class sub-folders.")
    return files, labels, classes


def read_image_file(file, size: int | None = None) -> np.ndarray:
    """One image file as uint8 H x W x 3 (RGB), resized (bilinear, antialiased) to ``size`` x ``size`` if given."""
    try:
        with Image.open(file) as im:
            im = im.convert("RGB")
            if size:
                im = im.resize((size, size), Image.BILINEAR, reducing_gap=None)
            return np.asarray(im)
    except OSError as exc:
        raise UvoodError(f"{file} is not a readable image ({exc}); remove or replace it.") from None


def read_image_folder(root, size: int | None = None) -> tuple[list, np.ndarray, list[str]]:
    """ImageFolder layout ``root/<class>/<image>``: (images, labels, class names).

    Classes are the sorted sub-folder names. Images are uint8 H x W x 3 arrays; with ``size``
    they are resized (bilinear, antialiased) to ``size`` x ``size`` and returned as one array.
    """
    files, labels, classes = list_image_folder(root)
    images = [read_image_file(file, size) for file in files]
    y = np.asarray(labels, np.int64)
    return (np.stack(images) if size else images), y, classes
