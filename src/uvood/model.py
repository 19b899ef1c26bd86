"""Any classifier in, ``(h, logits)`` out, from ONE forward pass.

The *head* is the layer that produces the logits: the last ``nn.Linear`` executed in the
forward pass, or a 1x1 ``nn.Conv2d`` whose output is N x C x 1 x 1. ``h`` is the head's
input, flattened to N x D (the encoding of the paper, Section 3.1), and ``logits`` is the
head's output, flattened to N x C (the ``f_theta(x)`` fed to the softmax).

The head is found with forward hooks, so no method names are required of the model: it is the
layer whose output the model returns (the tensor, the first entry of a returned tuple, or the
``"logits"`` entry of a returned dict), checked value for value. A model with an auxiliary
classifier is therefore never scored on the auxiliary layer; when no layer's output is the
returned logits, uvood refuses and lists the candidates. Models whose head is unusual can name
it: ``head="fc"`` (a dotted module path) or ``head=module``.
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


def model_logits(output, n: int) -> torch.Tensor | None:
    """The logits in a model's return value, flattened to n x C: the tensor itself, the first entry
    of a tuple or list (the main output, as in torchvision's Inception / GoogLeNet), or the
    ``"logits"`` entry of a dict; None if there is none."""
    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    elif isinstance(output, dict):
        output = output.get("logits")
    if not isinstance(output, torch.Tensor) or output.ndim == 0 or output.shape[0] != n:
        return None
    return output.reshape(n, -1)


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal shapes and values (NaN equal to NaN; ``a`` cast to ``b``'s dtype)."""
    if a.shape != b.shape:
        return False
    a = a.to(b.dtype)
    return torch.equal(a, b) or bool(((a == b) | (a.isnan() & b.isnan())).all())


def _run_and_choose(model: nn.Module, x: torch.Tensor, head_module: nn.Module | None):
    """One forward pass with capture hooks; return ``(head module, its input, flat output)``.

    Without an explicit head, the head is the last executed candidate whose flattened output IS the
    model's logits (:func:`model_logits`), value for value. A candidate whose output the model does
    not return (an auxiliary classifier, or a head whose output the model transforms further) is
    never taken silently: the error lists the candidates and asks for ``head=``.
    """
    cap = _Capture(model, head_module)
    try:
        output = model(x)
    finally:
        cap.remove()
    n = x.shape[0]
    returned = model_logits(output, n)
    for module, inp, out in reversed(cap.calls):
        flat = _flat_head_output(module, out)
        if flat is None or flat.shape[0] != n:
            continue
        if head_module is not None:
            return module, inp, flat
        if returned is not None and _same_values(flat, returned):
            return module, inp, flat
    names = {id(m): name for name, m in model.named_modules()}
    calls = [(m, out) for m, _, out in cap.calls]
    if returned is not None and any(out.numel() == returned.numel() for _, out in calls):
        calls = [(m, out) for m, out in calls if out.numel() == returned.numel()]  # same N x C: classifiers
    ran = list(dict.fromkeys(repr(names.get(id(m), "?")) for m, _ in calls))
    shape = tuple(returned.shape) if returned is not None else type(output).__name__
    if returned is not None and ran:
        raise UvoodError(
            f"None of the linear layers of {type(model).__name__} produces the logits the model returns "
            f"(shape {shape}); candidates {', '.join(ran[-8:])}. An auxiliary classifier, or logits "
            "transformed after the last layer, would give scores of other numbers than the model's output. "
            + HEAD_HELP)
    first = output[0] if isinstance(output, (tuple, list)) and output else output
    if isinstance(first, torch.Tensor) and (first.ndim == 0 or first.shape[0] != n):
        raise UvoodError(f"{type(model).__name__} returned an output of shape {tuple(first.shape)} for an input of "
                         f"shape {tuple(x.shape)}: its first axis is not the batch of N = {n} samples. If the input "
                         "is a single sample, add the batch axis (x[None]).")
    raise UvoodError(f"Could not find the layer that produces the logits of {type(model).__name__} "
                     f"(output {shape}; a tensor, a tuple whose first entry is the logits, or a dict with a "
                     "'logits' entry is expected). " + HEAD_HELP)


def forward_head(model: nn.Module, x: torch.Tensor, head: nn.Module | str | None = None
                 ) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """:func:`forward_features` that also returns the head module: ``(head, h, logits)``."""
    module, h, logits = _run_and_choose(model, x, resolve_head(model, head))
    return module, h.reshape(x.shape[0], -1), logits


def forward_features(
    model: nn.Module, x: torch.Tensor, head: nn.Module | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass of ``model`` on ``x``; return ``(h, logits)`` as N x D and N x C.

    Runs under whatever grad mode the caller chose (the gradient engine needs autograd; feature
    extraction wraps this in ``torch.no_grad``). Call it inside :func:`eval_mode` for scoring.
    """
    _, h, logits = forward_head(model, x, head)
    return h, logits


def find_head(model: nn.Module, example: torch.Tensor, head: nn.Module | str | None = None) -> nn.Module:
    """Return the head module that :func:`forward_features` uses for this model (probe forward)."""
    head_module = resolve_head(model, head)
    if head_module is not None:
        return head_module
    from .devices import follow

    with torch.no_grad(), eval_mode(model):
        return _run_and_choose(model, follow(example, model), None)[0]


def num_classes(model: nn.Module, example: torch.Tensor, head=None) -> int:
    with torch.no_grad(), eval_mode(model):
        _, logits = forward_features(model, example[:1], head)
    return int(logits.shape[1])


# ---------------------------------------------------------------- what the model takes

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def parse_dtype(dtype) -> torch.dtype | None:
    """``dtype=`` of the entry points: None (the model's own), torch.float32 / float64 or their names."""
    if dtype is None or dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.removeprefix("torch.")]
    raise UvoodError(f"dtype={dtype!r} is not supported; use None (the model's own), 'float32' or 'float64'.")


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating parameter (float32 for a model without one)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def model_channels(model: nn.Module) -> int | None:
    """The channel count of a model that takes images: ``in_channels`` of its first registered layer
    with parameters when that is an ``nn.Conv2d``; None for any other model."""
    for m in model.modules():
        if any(True for _ in m.parameters(recurse=False)):
            return m.in_channels if isinstance(m, nn.Conv2d) else None
    return None


def input_range(model: nn.Module) -> tuple[float, float] | None:
    """The input range a model declares: ``model.input_range`` (lo, hi) if set, (0, 1) for uvood zoo models
    (they normalise inside themselves), else None."""
    declared = getattr(model, "input_range", None)
    if isinstance(declared, (tuple, list)) and len(declared) == 2:
        return float(declared[0]), float(declared[1])
    from .zoo.architectures import Normalize

    if any(isinstance(m, Normalize) for m in model.modules()):
        return 0.0, 1.0
    return None


def with_dtype(model: nn.Module, head, dtype: torch.dtype | None):
    """``(model, head)`` running in ``dtype``: the model itself when it already has that dtype (or dtype
    is None), else a copy converted to it, with ``head`` mapped onto the copy. A float64 copy makes the
    scores of a sample independent of the batch it is in (see :func:`uvood.score_model`)."""
    import copy

    dtype = parse_dtype(dtype)
    if dtype is None or dtype == model_dtype(model):
        return model, head
    module = resolve_head(model, head)
    twin = copy.deepcopy(model).to(dtype)
    return twin, (None if module is None else dict(twin.named_modules())[head_name(model, module)])
