"""Test-only access to the detectors of pytorch-ood 0.4.0, the parity peer (never imported by uvood).

``pytorch_ood/__init__.py`` imports its data sets and models, which import torchvision; PyPI's
torchvision does not import beside the CPU torch pinned here ("operator torchvision::nms does not
exist"). Its detectors (``pytorch_ood.detector``, ``.api``, ``.utils``) import only torch, numpy,
scipy and scikit-learn, so :func:`pytorch_ood_detectors` registers a bare ``pytorch_ood`` package
object (its search path, without running its ``__init__``) and imports ``pytorch_ood.detector``
from it. Nothing of torchvision is stubbed or imported.

Install (no dependencies, so pip pulls no other torch): ``pip install --no-deps -r requirements-peers.txt``.
Without the peer the parity tests skip on a developer's machine, and fail under CI (CI=true).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import sys
import types

import pytest

VERSION = "0.4.0"


def pytorch_ood_detectors():
    """The module ``pytorch_ood.detector`` of pytorch-ood 0.4.0, imported without torchvision."""
    spec = importlib.util.find_spec("pytorch_ood")
    if spec is None or importlib.metadata.version("pytorch-ood") != VERSION:
        msg = (f"pytorch-ood=={VERSION} is not installed: pip install --no-deps -r requirements-peers.txt "
               "(found " + (importlib.metadata.version("pytorch-ood") if spec else "none") + ")")
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    if "pytorch_ood" not in sys.modules:
        package = types.ModuleType("pytorch_ood")
        package.__path__ = list(spec.submodule_search_locations)
        package.__spec__ = spec
        package.__version__ = VERSION
        sys.modules["pytorch_ood"] = package
    return importlib.import_module("pytorch_ood.detector")
