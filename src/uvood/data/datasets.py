"""Named data sets: ``load(name, split)`` -> :class:`ImageSet` (uint8 NHWC images + labels).

Files live in the data folder: ``data_dir=`` or the ``UVOOD_DATA`` environment variable.
Each shipped file's full sha256 is a constant here and is checked on first use; the result
is cached in memory by (path, size, mtime), so a file is hashed once per process.

``identity`` is a stable string usable as a cache key:
``name/split/sha256[:16]/subset`` (subset = ``all``, ``limit=N`` or ``size=S``).
``limit=N`` takes N evenly spaced images (``round(linspace(0, len - 1, N))``), so
class-major files keep their class balance.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..cache import atomic_write
from ..errors import UvoodError
from . import formats
from .transforms import resize_center_crop

SHARED_HOW = ("it is one of uvood's prepared data files; copy the data folder (see its README.md) and set "
              "--data-dir or UVOOD_DATA to it")


@dataclass(frozen=True)
class DatasetInfo:
    """A named data set: display name, per-split file and sha256, format and classes."""

    name: str
    display: str
    files: dict[str, str]
    sha256: dict[str, str]
    fmt: str  # "npz" | "jpeg" | "svhn-mat"
    num_classes: int
    hwc: tuple | None
    classes: tuple[str, ...] = ()
    how_to_get: str = SHARED_HOW
    unlabelled: tuple[str, ...] = ()
    notes: str = ""
    label_space: str = ""  # "imagenet-1k": labels index a 1,000-class ImageNet classifier's outputs directly


DIGITS = tuple(str(i) for i in range(10))
FASHION = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
CIFAR = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

DATASETS: dict[str, DatasetInfo] = {d.name: d for d in [
    DatasetInfo("mnist", "MNIST", {"train": "mnist_train.npz", "test": "mnist_test.npz"},
                {"train": "f68f2be4651f8493c2e6c6f9823ce15b31b5ac8408212f77e5c9d6a79a8c1180",
                 "test": "6039069bcb922bca95d26b83bf8966d0e74b04ef81e298c31d514d8ae7701924"},
                "npz", 10, (28, 28, 1), DIGITS),
    DatasetInfo("fashionmnist", "Fashion-MNIST",
                {"train": "fashionmnist_train.npz", "test": "fashionmnist_test.npz"},
                {"train": "ebb96bab2aa6ac95f4ca18b3d925145ff944f4d09ac8cf98d12a28d564e732fd",
                 "test": "5834519bb8b58990da21e7ea8c4024a928355be292c726a5f43bd0815e69cfb2"},
                "npz", 10, (28, 28, 1), FASHION),
    DatasetInfo("cifar10", "CIFAR-10 (JPEG copy)",
                {"train": "cifar10jpg_train_jpeg.npz", "test": "cifar10jpg_test_jpeg.npz"},
                {"train": "361badd6256479306710d675d7e13752b7e1043a3f928634298cd139a7fc0657",
                 "test": "eae28abd520dd3d089f93817e8fba347664dca7787e88ed0060fcc52fd42607d"},
                "jpeg", 10, (32, 32, 3), CIFAR,
                notes="JPEG q75 copy of CIFAR-10, not the official pixels (about 28 dB PSNR)."),
    DatasetInfo("tinyimagenet", "Tiny-ImageNet-200",
                {"val": "tinyimagenet_val_jpeg.npz", "test": "tinyimagenet_test_jpeg.npz"},
                {"val": "d8525a4fcb35623792922c9e2abe94c9bdf7cc09e52c8187a5f9e32cb23220a9",
                 "test": "e122dd31bbca6c51086f6b5ed8741f4d1c97ba0bd61a5821a491c7665c277a84"},
                "jpeg", 200, (64, 64, 3), unlabelled=("test",),
                notes="val labelled (y indexes tinyimagenet_wnids.txt), test unlabelled (y = -1)."),
    DatasetInfo("textures", "Describable Textures (DTD, 10-class subset)", {"all": "textures10_all_jpeg.npz"},
                {"all": "c2e1e31455ac25ab7859f181b0de22c8d4aaec6d4c8aae809d7225bdb042f5df"},
                "jpeg", 10, None,
                classes=("banded", "blotchy", "braided", "bubbly", "bumpy", "chequered", "cobwebbed", "cracked",
                         "crosshatched", "crystalline"),
                notes="variable image size: decoded lazily, or resized with size=S (shorter side, centre crop)."),
    DatasetInfo("imagenet1k", "ImageNet-1k photos",
                {"sample": "imagenet1k_sample_jpeg.npz", "photos750": "imagenet1k_photos750_jpeg.npz"},
                {"sample": "079b807e6c8b6fa98855b5945cdb14c595a2aea59ecb39afe7ae60be9b1521c8",
                 "photos750": "52fd34ba1e1788829d00085382e57114e68e9dbc221416483945aee2d065fa9a"},
                "jpeg", 1000, (256, 256, 3), label_space="imagenet-1k",
                notes="sample: one photo per class (ID test set; ImageNet split unknown, possibly training "
                      "images); photos750: 5 other photos for each of 150 classes (for fitting ID statistics). "
                      "y = ImageNet-1k index (imagenet_class_index.json)."),
    DatasetInfo("svhn", "SVHN (official .mat)", {"train": "train_32x32.mat", "test": "test_32x32.mat"},
                {}, "svhn-mat", 10, (32, 32, 3), DIGITS,
                how_to_get="download it with `uvood data download svhn` (official site, md5-checked) into the "
                           "data folder"),
    DatasetInfo("cifar10-official", "CIFAR-10 (official python batches)",
                {"train": "cifar-10-batches-py", "test": "cifar-10-batches-py"}, {}, "cifar-python", 10,
                (32, 32, 3), CIFAR,
                how_to_get="download it with `uvood data download cifar10-official` (official site, md5-checked) "
                           "into the data folder"),
]}

AUX_FILES = {  # side files of the data folder, full sha256
    "imagenet_class_index.json": "ecae206bed9024d38507c0c6a3f8c4dc079f465ad34e44c3ffd0ea5ddf6cfa50",
    "tinyimagenet_wnids.txt": "a36eb4b603007f1985cdfbfc5987166a2710b3c6f0f6d3e29636fc129bba527b",
}

CIFAR_PYTHON = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}

_VERIFIED: dict[tuple[str, int, int], str] = {}


def data_dir(path=None) -> Path:
    """The data folder: ``path`` if given, else ``$UVOOD_DATA``; an error says how to set it."""
    path = path or os.environ.get("UVOOD_DATA")
    if not path:
        raise UvoodError("no data folder given: pass --data-dir DIR (data_dir=) or set the environment variable "
                         "UVOOD_DATA to the folder holding uvood's data files.")
    return Path(path).expanduser()


def file_sha256(path) -> str:
    """Full hex sha256 of a file, memoised per process by (path, size, mtime)."""
    stat = os.stat(path)
    key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _VERIFIED:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        _VERIFIED[key] = digest.hexdigest()
    return _VERIFIED[key]


def info(name: str) -> DatasetInfo:
    """The :class:`DatasetInfo` of a named data set."""
    if name not in DATASETS:
        raise UvoodError(f"unknown data set {name!r}; known: {sorted(DATASETS)} (see `uvood data list`).")
    return DATASETS[name]


def list_datasets() -> list[str]:
    return sorted(DATASETS)


def locate(name: str, split: str, data_dir_=None, verify: bool = True) -> tuple[Path, str]:
    """(path, sha256) of a split's file, after checking that it exists and its checksum matches."""
    ds = info(name)
    if split not in ds.files:
        raise UvoodError(f"{ds.display} has no split {split!r}; its splits: {sorted(ds.files)}.")
    path = data_dir(data_dir_) / ds.files[split]
    if ds.fmt == "cifar-python":
        names = CIFAR_PYTHON[split]
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise UvoodError(f"{ds.display} {split} files not found: expected {[str(path / n) for n in missing]}. "
                             f"To get them: {ds.how_to_get}.")
        sha = hashlib.sha256("".join(file_sha256(path / n) for n in names).encode()).hexdigest()
        return path, sha
    if not path.is_file():
        raise UvoodError(f"{ds.display} {split} file not found: expected {path}. To get it: {ds.how_to_get}.")
    sha = file_sha256(path)  # always: the identity needs it (memoised per process)
    expected = ds.sha256.get(split)
    if verify and expected and sha != expected:
        raise UvoodError(f"{path} has sha256 {sha[:16]}..., expected {expected[:16]}... (wrong version, damaged or "
                         f"edited file). Replace it with the original: {ds.how_to_get}.")
    return path, sha


def check_model_classes(name: str, num_classes: int, model: str = "the model") -> None:
    """A data set whose labels are ImageNet-1k indices needs a classifier with 1,000 outputs."""
    ds = info(name)
    if ds.label_space == "imagenet-1k" and num_classes != 1000:
        raise UvoodError(f"{ds.display} is labelled with ImageNet-1k indices and needs an ImageNet-1k classifier "
                         f"(1,000 outputs), but {model} has {num_classes}. Use an ImageNet-1k model (e.g. "
                         "efficientnet-lite0 or efficientnet-lite2) or an ID set of your model's classes.")


@dataclass
class ImageSet:
    """Images of one split: ``x`` uint8 N x H x W x C (for variable-size images without
    ``size``: a lazy :class:`formats.JpegArchive`, or a list of arrays when ``limit`` is
    given), ``y`` int64 (-1 = unlabelled), ``indices`` into the file (None = all), plus
    identity and provenance."""

    name: str
    split: str
    x: object
    y: np.ndarray
    num_classes: int
    classes: tuple[str, ...]
    identity: str
    sha256: str
    path: Path
    display: str
    indices: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.y)


def subset_indices(n: int, limit: int | None) -> np.ndarray | None:
    """``limit`` evenly spaced indices of ``range(n)`` (None = all)."""
    if limit is None or limit >= n:
        return None
    if limit < 1:
        raise UvoodError(f"limit must be a positive number of images, got {limit}.")
    return np.unique(np.round(np.linspace(0, n - 1, int(limit))).astype(np.int64))


def _resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """Shorter side to ``size`` (bilinear, antialiased), then the central ``size`` x ``size`` crop."""
    return resize_center_crop(image, size, size)


def _decode_cached(archive: formats.JpegArchive, idx, hwc, cache_dir, key: str) -> np.ndarray:
    if cache_dir is None:
        return archive.decode(idx, hwc)
    cache = Path(cache_dir) / f"decoded-{key}.npy"
    if cache.is_file():
        return np.load(cache, allow_pickle=False)
    x = archive.decode(idx, hwc)
    atomic_write(cache, lambda f: np.save(f, x))
    return x


def _read(ds: DatasetInfo, path: Path, split: str):
    """(images or lazy archive, labels, class names) of one split's file(s)."""
    if ds.fmt == "npz":
        x, y = formats.read_decoded_npz(path, ds.num_classes, ds.hwc)
    elif ds.fmt == "svhn-mat":
        x, y = formats.read_svhn_mat(path)
    elif ds.fmt == "cifar-python":
        x, y = formats.read_cifar10_python(path, split)
    else:
        x = formats.JpegArchive(path, ds.num_classes, allow_unlabelled=split in ds.unlabelled)
        return x, x.y, tuple(str(c) for c in x.extra.get("classes", ds.classes))
    if split not in ds.unlabelled and (y < 0).any():
        raise UvoodError(f"{path}: split {split!r} of {ds.display} must be labelled but has labels -1.")
    return x, y, ds.classes


def _identity(name: str, split: str, sha: str, limit, size) -> str:
    subset = ([f"limit={limit}"] if limit else []) + ([f"size={size}"] if size else [])
    return f"{name}/{split}/{sha[:16]}/{','.join(subset) or 'all'}"


def _count(ds: DatasetInfo, path: Path, split: str) -> int:
    """Number of images of a split, reading only its labels where the format allows."""
    if ds.fmt in ("npz", "jpeg"):
        try:
            with np.load(path, allow_pickle=False) as archive:
                return int(np.asarray(archive["y"]).shape[0])
        except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError):
            pass  # _read gives the precise error
    return len(_read(ds, path, split)[1])


def identity(name: str, split: str, data_dir=None, limit: int | None = None, size: int | None = None,
             verify: bool = True) -> str:
    """The ``identity`` that :func:`load` with these arguments gives, without decoding any image
    (for cache lookups that only load the images on a miss)."""
    ds = info(name)
    path, sha = locate(name, split, data_dir, verify)
    n = _count(ds, path, split)
    return _identity(name, split, sha, subset_indices(n, limit) is not None and limit, size)


def load(name: str, split: str, data_dir=None, limit: int | None = None, size: int | None = None,
         cache_dir=None, verify: bool = True) -> ImageSet:
    """Load split ``split`` of data set ``name`` as an :class:`ImageSet`.

    ``limit`` keeps N evenly spaced images; ``size`` resizes variable-size images (textures:
    shorter side to ``size``, centre crop; without it ``x`` is a lazy archive);
    ``cache_dir`` stores decoded JPEG arrays as ``.npy``; ``verify`` checks the sha256.
    """
    ds = info(name)
    if size and ds.hwc is not None:
        raise UvoodError(f"size= applies to variable-size data sets only; {ds.display} is {ds.hwc[0]} px: "
                         "convert it with uvood.data.transforms.to_model_format.")
    path, sha = locate(name, split, data_dir, verify)
    x, y, classes = _read(ds, path, split)
    idx = subset_indices(len(y), limit)
    identity = _identity(name, split, sha, idx is not None and limit, size)
    if isinstance(x, formats.JpegArchive):
        order = range(len(y)) if idx is None else idx
        if ds.hwc is not None:
            x = _decode_cached(x, idx, ds.hwc, cache_dir, identity.replace("/", "_").replace(",", "_"))
        elif size:
            x = np.stack([_resize_square(x[i], size) for i in order])
        elif idx is not None:
            x = [x[i] for i in order]  # variable sizes: a list of H x W x 3 arrays
    elif idx is not None:
        x = x[idx]
    y = y if idx is None else y[idx]
    return ImageSet(name=name, split=split, x=x, y=y, num_classes=ds.num_classes, classes=classes,
                    identity=identity, sha256=sha, path=path, display=ds.display, indices=idx)


def folder_identity(root, size: int | None = None, name: str | None = None) -> tuple[str, str, int]:
    """(identity, sha256 over every file's path and content, number of images) of an ImageFolder,
    reading no image."""
    files = formats.list_image_folder(root)[0]  # a missing or empty folder fails here, with its own message
    digest = hashlib.sha256()
    for path in sorted(Path(root).rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(root)).encode())
            digest.update(file_sha256(path).encode())
    sha = digest.hexdigest()
    name = name or Path(root).name
    return f"folder:{name}/all/{sha[:16]}/{f'size={size}' if size else 'all'}", sha, len(files)


def image_folder(root, size: int | None = None, name: str | None = None) -> ImageSet:
    """A user's ImageFolder (``root/<class>/<images>``) as an :class:`ImageSet`; ``size``
    resizes every image to ``size`` x ``size`` (else ``x`` is a list of arrays)."""
    x, y, classes = formats.read_image_folder(root, size)
    identity, sha, _ = folder_identity(root, size, name)
    name = name or Path(root).name
    return ImageSet(name=name, split="all", x=x, y=y, num_classes=len(classes), classes=tuple(classes),
                    identity=identity, sha256=sha, path=Path(root), display=f"image folder {root}")


SAMPLE_SETS = ("mnist", "fashionmnist")
SAMPLES = Path(__file__).resolve().parent / "samples" / "samples.npz"


def sample(name: str) -> ImageSet:
    """The bundled offline sample of a data set's test split (300 evenly spaced images of
    ``mnist`` or ``fashionmnist``; made by ``scripts/make_samples.py``); needs no data folder."""
    if name not in SAMPLE_SETS:
        raise UvoodError(f"no bundled sample of {name!r}; bundled: {list(SAMPLE_SETS)}.")
    arrays = formats.read_npz(SAMPLES, (f"{name}_x", f"{name}_y", f"{name}_index", f"{name}_sha256"))
    ds = info(name)
    x = formats.check_images(arrays[f"{name}_x"], str(SAMPLES), ds.hwc)
    y = formats.check_labels(arrays[f"{name}_y"], len(x), ds.num_classes, str(SAMPLES))
    sha = str(arrays[f"{name}_sha256"])
    return ImageSet(name=name, split="test", x=x, y=y, num_classes=ds.num_classes, classes=ds.classes,
                    identity=f"{name}/test/{sha[:16]}/sample={len(y)}", sha256=sha, path=SAMPLES,
                    display=f"{ds.display} (bundled sample)", indices=arrays[f"{name}_index"])
