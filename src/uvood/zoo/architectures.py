"""Zoo architectures, after the pytorch-playground collection used by the paper.

Every zoo model takes float images in [0, 1], N x C x H x W at the data set's native size,
and normalises inside itself: ``x_n = (x - mean) / std`` per channel, with the training
set's statistics stored as buffers. The head (the last ``nn.Linear``) sees the encoding h.

* :class:`MLP` -- MNIST MLP 784-256-256-10, ReLU and dropout 0.2 after each hidden layer.
* :class:`PlaygroundCNN` -- the family ``[c, c, M, 2c, 2c, M, 4c, 4c, M, (8c, pad 0), M]``:
  3x3 convs (padding 1 unless marked ``pad 0``), each followed by
  ``BatchNorm2d(affine=False)`` and ReLU (and dropout when ``dropout > 0``), ``M`` = 2x2 max
  pool, then one linear head on the 8c features. The family needs 32 px input
  (32 -> 16 -> 8 -> 4 -> conv pad 0 -> 2 -> 1); 28 px inputs (Fashion-MNIST) are zero-padded
  by 2 px on each side inside the model, *before* normalisation, so a black border is added.

Zoo widths: ``fashionmnist-cnn`` and ``svhn-cnn`` c = 32 with dropout 0.3 (the paper's
SVHN model); ``cifar10-cnn`` c = 48 without dropout, a CPU fallback for the paper's c = 128.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UvoodError


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, with the statistics as (non-trainable) buffers."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class MLP(nn.Module):
    """784-256-256-10 MLP with ReLU + dropout 0.2; input N x 1 x 28 x 28 in [0, 1]."""

    def __init__(self, in_pixels: int = 784, hidden: tuple[int, ...] = (256, 256), num_classes: int = 10,
                 dropout: float = 0.2, mean: float = 0.1307, std: float = 0.3081):
        super().__init__()
        self.normalize = Normalize((mean,), (std,))
        layers: list[nn.Module] = []
        width = in_pixels
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU(), nn.Dropout(dropout)]
            width = size
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width, num_classes)
        self.in_pixels = in_pixels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalize(x).flatten(1)
        if x.shape[1] != self.in_pixels:
            raise UvoodError(f"MLP expects {self.in_pixels} pixels per image, got {x.shape[1]}; "
                             "convert the images with uvood.data.transforms.to_model_format.")
        return self.classifier(self.features(x))


def cnn_config(c: int) -> list:
    """The playground CNN layer list for width ``c``: ints are 3x3 convs, ``(w, 0)`` pad 0, ``"M"`` pool."""
    return [c, c, "M", 2 * c, 2 * c, "M", 4 * c, 4 * c, "M", (8 * c, 0), "M"]


class PlaygroundCNN(nn.Module):
    """The playground CNN family (see module docstring); input N x C x 32 x 32 (or 28, padded)."""

    def __init__(self, c: int = 32, in_channels: int = 3, num_classes: int = 10, dropout: float = 0.0,
                 mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None, pad_to: int = 32):
        super().__init__()
        self.normalize = Normalize(mean or (0.5,) * in_channels, std or (0.25,) * in_channels)
        self.pad_to = pad_to
        layers: list[nn.Module] = []
        width = in_channels
        for item in cnn_config(c):
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            out, padding = item if isinstance(item, tuple) else (item, 1)
            layers += [nn.Conv2d(width, out, 3, padding=padding), nn.BatchNorm2d(out, affine=False), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = out
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-1]
        if size != self.pad_to:
            if size > self.pad_to or x.shape[-2] != size:
                raise UvoodError(f"PlaygroundCNN expects square inputs of at most {self.pad_to} px, got "
                                 f"{tuple(x.shape[-2:])}; resize with uvood.data.transforms.to_model_format.")
            lo = (self.pad_to - size) // 2
            x = F.pad(x, (lo, self.pad_to - size - lo, lo, self.pad_to - size - lo))
        return self.classifier(self.features(self.normalize(x)).flatten(1))


# name -> (constructor, keyword arguments, native input (C, H, W))
SPECS: dict[str, dict] = {
    "mnist-mlp": {"arch": "MLP", "kwargs": {}, "input": (1, 28, 28), "dataset": "mnist"},
    "fashionmnist-cnn": {"arch": "PlaygroundCNN", "input": (1, 28, 28), "dataset": "fashionmnist",
                         "kwargs": {"c": 32, "in_channels": 1, "dropout": 0.3, "mean": (0.2860,), "std": (0.3530,)}},
    "svhn-cnn": {"arch": "PlaygroundCNN", "input": (3, 32, 32), "dataset": "svhn",
                 "kwargs": {"c": 32, "in_channels": 3, "dropout": 0.3, "mean": (0.4377, 0.4438, 0.4728),
                            "std": (0.1980, 0.2010, 0.1970)}},
    # CPU fallback: c = 48 trains in about an hour on one CPU core; the paper's model is c = 128 (--c 128)
    "cifar10-cnn": {"arch": "PlaygroundCNN", "input": (3, 32, 32), "dataset": "cifar10",
                    "kwargs": {"c": 48, "in_channels": 3, "dropout": 0.0, "mean": (0.4914, 0.4822, 0.4465),
                               "std": (0.2470, 0.2435, 0.2616)}},
}

ARCHITECTURES = {"MLP": MLP, "PlaygroundCNN": PlaygroundCNN}


def build(name: str, **overrides) -> nn.Module:
    """A freshly initialised zoo architecture by model name (``overrides`` replace kwargs, e.g. ``c=48``)."""
    if name not in SPECS:
        raise UvoodError(f"unknown zoo architecture {name!r}; known: {sorted(SPECS)}.")
    spec = SPECS[name]
    return ARCHITECTURES[spec["arch"]](**{**spec["kwargs"], **overrides})
