"""``--device cpu|cuda|cuda:N|mps``: where models run.

The Python API follows the model: inputs are moved to the device of the model's parameters, and results
come back on the CPU. The command line parses ``--device`` with :func:`parse_device` (a clear error for a
device this machine lacks) and makes it the default of :func:`uvood.zoo.load` and of the models it loads
(:func:`use`), so that ``uvood bench --device cuda`` runs its zoo models there without other changes.
Under ``torchrun``, ``cuda`` means ``cuda:LOCAL_RANK`` (one GPU per rank, :func:`uvood.distributed.local_device`).
"""

from __future__ import annotations

import re

import torch

from .errors import UvoodError

#: the device models are loaded onto when none is given (set by :func:`use`; the CLI's ``--device``)
_DEFAULT: list[torch.device] = [torch.device("cpu")]

CHOICES = "cpu, cuda, cuda:N (N = 0, 1, ...) or mps"


def parse_device(name: str | torch.device | None) -> torch.device:
    """``name`` as a :class:`torch.device` this machine has; a clear :class:`UvoodError` otherwise."""
    if name is None:
        return _DEFAULT[0]
    if isinstance(name, torch.device):
        name = str(name)
    if not isinstance(name, str) or not re.fullmatch(r"cpu|mps|cuda(:\d+)?", name.strip()):
        raise UvoodError(f"--device {name!r} is not a device name: use {CHOICES}.")
    device = torch.device(name.strip())
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UvoodError(f"--device {name}: this machine has no CUDA GPU that torch {torch.__version__} can "
                             "use (torch.cuda.is_available() is False). Use --device cpu, or a CUDA build of torch.")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UvoodError(f"--device {name}: this machine has {count} CUDA GPU(s), numbered 0 to {count - 1}.")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UvoodError(f"--device {name}: Apple's MPS backend is not available here. Use --device cpu.")
    return device


def use(name: str | torch.device | None) -> torch.device:
    """Make ``name`` (checked by :func:`parse_device`) the default device of the models uvood loads."""
    _DEFAULT[0] = parse_device(name)
    return _DEFAULT[0]


def restore(device: torch.device) -> None:
    """Put back a default device that :func:`default_device` returned before (the CLI does, after a command)."""
    _DEFAULT[0] = device


def default_device() -> torch.device:
    return _DEFAULT[0]


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (the CPU for a model without any)."""
    t = next((t for t in (*model.parameters(), *model.buffers())), None)
    return t.device if t is not None else torch.device("cpu")


def model_float(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """(device, float dtype) the model computes in: those of its first floating parameter or buffer
    ((cpu, float32) for a model without any)."""
    t = next((t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()), None)
    return (t.device, t.dtype) if t is not None else (torch.device("cpu"), torch.float32)


def follow(x: torch.Tensor, model: torch.nn.Module) -> torch.Tensor:
    """``x`` on the model's device, and in the model's float dtype when ``x`` is floating (integer tensors such
    as labels keep theirs): what every probe or anchor tensor goes through before it meets the model."""
    device, dtype = model_float(model)
    return x.to(device=device, dtype=dtype) if x.is_floating_point() else x.to(device)


def probe(model: torch.nn.Module, shape) -> torch.Tensor:
    """A zero input of ``shape`` (one sample: 1 x C x H x W) on the model's device, in its float dtype."""
    device, dtype = model_float(model)
    return torch.zeros(tuple(shape), device=device, dtype=dtype)
