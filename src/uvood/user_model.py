"""A user's own model, named on the command line or in a benchmark spec.

``package.module:factory`` (or ``path/to/file.py:factory``) names a function that returns the
``nn.Module``; ``weights`` is a file of tensors only — ``torch.save(model.state_dict(), FILE)`` —
read with ``torch.load(weights_only=True)`` and loaded into that model. No other object is
ever unpickled. The user's module is imported from the installed packages or the current folder
(importing it runs its code: name only modules you trust).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

import torch
from torch import nn

from .errors import UvoodError

FORMS = "'package.module:factory' or 'path/to/file.py:factory'"


def is_factory_name(name: str) -> bool:
    """Whether ``name`` names a factory (``module:function``) rather than a zoo model."""
    return ":" in name


def _import(module: str):
    if module.endswith(".py"):
        path = Path(module)
        if not path.is_file():
            raise UvoodError(f"No Python file at {path} (from --model {module}:...); give {FORMS}.")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    added = os.getcwd() not in sys.path
    if added:  # the current folder, as `python -m` would have it
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(module)
    finally:
        if added:
            sys.path.remove(os.getcwd())


def load_user_model(name: str, weights: str | os.PathLike | None = None) -> nn.Module:
    """``module:factory`` -> ``factory()`` in eval mode, with ``weights`` loaded when given."""
    module, _, attr = name.partition(":")
    if not module or not attr:
        raise UvoodError(f"Cannot read the model factory {name!r}: give {FORMS}.")
    try:
        factory = getattr(_import(module), attr)
    except (ImportError, AttributeError) as e:
        raise UvoodError(f"Cannot import the model factory {name!r} ({e}); give {FORMS}.") from None
    try:
        model = factory()
    except Exception as e:
        raise UvoodError(f"The model factory {name!r} failed: {type(e).__name__}: {str(e)[:200]}") from None
    if not isinstance(model, nn.Module):
        raise UvoodError(f"The model factory {name!r} returned a {type(model).__name__}, not a torch nn.Module.")
    if weights is not None:
        load_weights(model, weights)
    return model.eval()


def load_weights(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a tensors-only state dict from ``path`` into ``model`` (every key and shape must match).

    Accepts ``model.state_dict()`` itself or a checkpoint dict holding it under ``"state_dict"``.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UvoodError(f"No weights file at {path}.") from None
    except Exception as e:  # an arbitrary pickled object, or not a torch file at all
        raise UvoodError(f"{path} cannot be read as a file of tensors ({type(e).__name__}: {str(e)[:150]}). Save "
                         "the weights with torch.save(model.state_dict(), FILE): uvood never unpickles other "
                         "objects.") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UvoodError(f"{path} holds no state dict {{name: tensor}}; save it with torch.save(model.state_dict(), "
                         "FILE).")
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
             if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        raise UvoodError(f"The weights in {path} do not fit the model: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}, other shapes {wrong[:5]}. Give the factory that built them.")
    model.load_state_dict(state)
    return model
