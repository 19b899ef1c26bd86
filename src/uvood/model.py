"""Any classifier in, ``(h, logits)`` out, from ONE forward pass.

The *head* is the layer that produces the logits: the last ``nn.Linear`` executed in the
forward pass, or a 1x1 ``nn.Conv2d`` whose output is N x C x 1 x 1. ``h`` is the head's
input, flattened to N x D (the encoding of the paper, Section 3.1), and ``logits`` is the
head's output, flattened to N x C (the ``f_theta(x)`` fed to the softmax).

The head is found with forward hooks, so no method names are required of the model. Models
whose head is unusual can name it: ``head="fc"`` (a dotted module path) or ``head=module``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from .errors import UvoodError

HEAD_HELP = (
    "Pass the layer that produces the logits explicitly, e.g. head='fc' (its dotted name in "
    "model.named_modules()) or head=model.classifier[-1]."
)


def _is_candidate(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.groups == 1


def resolve_head(model: nn.Module, head: nn.Module | str | None) -> nn.Module | None:
    """Turn a ``head=`` argument (module, dotted name or None) into a module of ``model``."""
    if head is None:
        return None
    if isinstance(head, str):
        modules = dict(model.named_modules())
        if head not in modules:
            linear = [n for n, m in modules.items() if _is_candidate(m)]
            raise UvoodError(f"head={head!r} is not a module of the model. Linear-like modules: {linear[-5:]}.")
        return modules[head]
    if isinstance(head, nn.Module):
        if not any(m is head for m in model.modules()):
            raise UvoodError("head= must be a submodule of the model (it is not found in model.modules()).")
        return head
    raise UvoodError(f"head= must be an nn.Module, a module name or None, got {type(head).__name__}.")


def head_name(model: nn.Module, head: nn.Module) -> str:
    for name, module in model.named_modules():
        if module is head:
            return name
    raise UvoodError("head is not a submodule of the model.")


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` in eval mode and restore every submodule's training flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


class _Capture:
    """Forward hooks that remember the last executed candidate head with its input and output."""

    def __init__(self, model: nn.Module, head: nn.Module | None):
        self.calls: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []
        targets = [head] if head is not None else [m for m in model.modules() if _is_candidate(m)]
        if not targets:
            raise UvoodError(f"No linear head found in {type(model).__name__}: it has no nn.Linear or 1x1 Conv2d. "
                             + HEAD_HELP)
        self.handles = [m.register_forward_hook(self._hook) for m in targets]

    def _hook(self, module, inputs, output):
        if isinstance(output, torch.Tensor) and inputs and isinstance(inputs[0], torch.Tensor):
            self.calls.append((module, inputs[0], output))

    def remove(self):
        for h in self.handles:
            h.remove()


def _flat_head_output(module: nn.Module, out: torch.Tensor) -> torch.Tensor | None:
    if isinstance(module, nn.Conv2d):
        if out.ndim != 4 or out.shape[2:] != (1, 1):
            return None
    return out.reshape(out.shape[0], -1)


def _run_and_choose(model: nn.Module, x: torch.Tensor, head_module: nn.Module | None):
    """One forward pass with capture hooks; return ``(head module, its input, flat output)``.

    Without an explicit head, the head is the last executed candidate whose flattened output has
    the shape of the model's output (N x C).
    """
    cap = _Capture(model, head_module)
    try:
        output = model(x)
    finally:
        cap.remove()
    if isinstance(output, (tuple, list)):
        output = output[0]
    n = x.shape[0]
    for module, inp, out in reversed(cap.calls):
        flat = _flat_head_output(module, out)
        if flat is None or flat.shape[0] != n:
            continue
        if head_module is not None or not isinstance(output, torch.Tensor) or flat.shape == output.reshape(n, -1).shape:
            return module, inp, flat
    shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
    raise UvoodError(f"Could not find the layer that produces the logits of {type(model).__name__} "
                     f"(output shape {shape}). " + HEAD_HELP)


def forward_features(
    model: nn.Module, x: torch.Tensor, head: nn.Module | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass of ``model`` on ``x``; return ``(h, logits)`` as N x D and N x C.

    Runs under whatever grad mode the caller chose (the gradient engine needs autograd; feature
    extraction wraps this in ``torch.no_grad``). Call it inside :func:`eval_mode` for scoring.
    """
    _, h, logits = _run_and_choose(model, x, resolve_head(model, head))
    return h.reshape(x.shape[0], -1), logits


def find_head(model: nn.Module, example: torch.Tensor, head: nn.Module | str | None = None) -> nn.Module:
    """Return the head module that :func:`forward_features` uses for this model (probe forward)."""
    head_module = resolve_head(model, head)
    if head_module is not None:
        return head_module
    with torch.no_grad(), eval_mode(model):
        return _run_and_choose(model, example, None)[0]


def num_classes(model: nn.Module, example: torch.Tensor, head=None) -> int:
    with torch.no_grad(), eval_mode(model):
        _, logits = forward_features(model, example[:1], head)
    return int(logits.shape[1])
