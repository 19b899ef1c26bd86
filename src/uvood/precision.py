"""``--precision float32|bfloat16``: bfloat16 autocast of the forward passes that produce features and logits.

With ``bfloat16`` every forward pass whose only products are the features ``h`` and the logits
``f(x)`` (:func:`uvood.extract`, the scores computed from them in :func:`uvood.score_model` and
:class:`uvood.Detector`, ``uvood score``, ``uvood bench``, ``uvood zoo eval``) runs under
``torch.autocast(device, dtype=torch.bfloat16)``: convolutions and matrix products in bfloat16
(8 bits of mantissa, relative rounding 2^-8 = 0.4 %), the rest in float32. ``h`` and the logits are
then kept in float32, and every score formula (energy, norms, Mahalanobis, shallow gradients of
Eq. 1-5, ...) runs on them in float32 / float64 as with ``float32``: only their inputs were rounded.

What stays float32 under ``bfloat16``, because bfloat16 is not shown to be safe there:

* the scores that backpropagate through the model (deep gradient scores, GradNorm, ExGrad, deep
  BatchGrad, ODIN's input perturbation): a per-sample gradient norm sums many products whose
  relative rounding in bfloat16 would not average out; they run their forward and backward passes
  in float32 whatever the precision (the cache keys of their values therefore do not change);
* ``dtype="float64"`` (the float64 reference, batch-independent scores) and float64 models:
  combining them with ``bfloat16`` is refused (:func:`check`), it would defeat their purpose.

Tolerance (:data:`TOLERANCE`, tested in tests/test_precision.py on the zoo's mnist-mlp, 300 MNIST and 300
Fashion-MNIST test images): per score, the median relative difference to float32 is at most 2 % and the
AUROC differs by at most 0.01. Measured on the zoo's cifar10-cnn, 400 CIFAR-10 test against 400
Tiny-ImageNet test images (2026-11-30): median relative differences 8e-4 (msp) to 1.0e-2 (exgrad), 99th
percentiles up to 9e-2 (exgrad), AUROC differences at most 5e-4 (energy, msp, maxlogit, norm(0.3)*energy,
norm(inf)*tv, exgrad, gradnorm). The precision enters every cache key of values computed under it
(:func:`key`), so bfloat16 and float32 results never mix.

Speed: bfloat16 pays on GPUs and on CPUs with bfloat16 units (AVX512-BF16, AMX); on a CPU without them
autocast is slower (measured 8x slower for cifar10-cnn on this project's 2-core CPU), so the default is float32.
"""

from __future__ import annotations

import contextlib

import torch

from .errors import UvoodError

CHOICES = ("float32", "bfloat16")

#: bounds of bfloat16 against float32 (tests/test_precision.py): median relative difference of a score, and
#: the AUROC difference of an ID / OOD pair
TOLERANCE = {"median_rel": 0.02, "auroc": 0.01}

#: the precision of the forward passes when none is given (set by :func:`use`; the CLI's ``--precision``)
_DEFAULT = ["float32"]


def parse(precision: str | None) -> str:
    """``precision`` checked: ``'float32'`` or ``'bfloat16'`` (None: the default, :func:`use`)."""
    if precision is None:
        return _DEFAULT[0]
    if isinstance(precision, torch.dtype):
        precision = str(precision).removeprefix("torch.")
    if precision not in CHOICES:
        extra = (" float16 is not offered: its range (65,504) overflows the logits and feature norms of real "
                 "models." if precision in ("float16", "half") else "")
        raise UvoodError(f"precision={precision!r} is not supported: use 'float32' or 'bfloat16' "
                         f"(--precision float32|bfloat16).{extra}")
    return precision


def use(precision: str | None) -> str:
    """Make ``precision`` the default of the forward passes uvood runs (the CLI's ``--precision``)."""
    _DEFAULT[0] = parse(precision) if precision is not None else "float32"
    return _DEFAULT[0]


def check(precision: str | None, dtype=None, model: torch.nn.Module | None = None) -> str:
    """The checked precision; bfloat16 with the float64 reference (``dtype=float64``) or a float64 model is refused."""
    precision = parse(precision)
    if precision != "bfloat16":
        return precision
    from .model import model_dtype, parse_dtype

    if parse_dtype(dtype) == torch.float64:
        raise UvoodError("precision='bfloat16' cannot be combined with dtype='float64' (--dtype float64): float64 is "
                         "the exact reference and bfloat16 autocast would round its forward pass to 8 bits. Choose "
                         "one: --precision float32 --dtype float64, or --precision bfloat16 without --dtype.")
    if dtype is None and model is not None and model_dtype(model) == torch.float64:  # it would run in float64
        raise UvoodError("precision='bfloat16' on a float64 model: autocast would round the float64 reference's "
                         "forward pass to 8 bits. Use precision='float32', or a float32 model.")
    return precision


def autocast(precision: str, device: torch.device):
    """The context of a forward pass in ``precision``: bfloat16 autocast on ``device``, or nothing."""
    if precision != "bfloat16":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def key(precision: str) -> list[str]:
    """What ``precision`` adds to a cache key: nothing for float32 (existing caches stay valid), else its name."""
    return [] if precision == "float32" else [f"precision={precision}"]


def forward_features(model: torch.nn.Module, x: torch.Tensor, head, precision: str
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`uvood.model.forward_features` in ``precision``: ``(h, logits)``, in float32 after a bfloat16 forward
    (the score formulas then run on them as after a float32 one)."""
    from .model import forward_features as forward

    with autocast(precision, x.device):
        h, z = forward(model, x, head)
    if precision == "bfloat16":
        h, z = h.float(), z.float()
    return h, z
