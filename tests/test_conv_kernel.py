"""The compiled convolution kernel (uvood.scores.conv_kernel) against float64 per-sample weight gradients."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from test_engine import label_cot, naive_norms
from test_gradient import assert_rel
from uvood.scores import conv_kernel, engine, get_score
from uvood.scores.engine import Reduction, RowGroup, per_sample_grad_reductions

needs_kernel = pytest.mark.skipif(not conv_kernel.available(), reason="compiled kernel unavailable here")

CONVS = [  # (Conv2d arguments, input height/width): padding, stride, dilation, padding modes, odd shapes
    (dict(in_channels=3, out_channels=5, kernel_size=3, padding=1), 7),
    (dict(in_channels=3, out_channels=7, kernel_size=3, stride=2, dilation=2, padding=2), 9),
    (dict(in_channels=2, out_channels=13, kernel_size=(3, 5), stride=(1, 2), padding=(1, 2)), 8),
    (dict(in_channels=3, out_channels=6, kernel_size=3, padding="same", padding_mode="reflect"), 5),
    (dict(in_channels=4, out_channels=12, kernel_size=2, padding=0), 4),
    (dict(in_channels=5, out_channels=16, kernel_size=1), 3),
]


def float64_norms(module, a, g, reds):
    """R x K x n: each reduction of W_{n,k} = G_{n,k} unfold(a_n)^T (+ offset), all in float64."""
    a64, pad = engine.ConvRule._padded(module, a.double())
    A = F.unfold(a64, module.kernel_size, dilation=module.dilation, padding=pad, stride=module.stride)  # n x d x T
    K, n, cout = g.shape[:3]
    W = torch.einsum("knct,ndt->kncd", g.double().reshape(K, n, cout, -1), A)
    out = []
    for nm, off in reds:
        t = W + (0 if off is None else off.double().reshape(cout, -1))
        out.append(t.abs().sum((2, 3)) if nm == "l1" else (t * t).sum((2, 3)))
    return torch.stack(out)


def layer(conv, hw, K, n=5, seed=0):
    torch.manual_seed(seed)
    module = nn.Conv2d(**conv)
    a = torch.randn(n, conv["in_channels"], hw, hw)
    out = module(a)
    g = torch.randn(n, K, *out.shape[1:]).transpose(0, 1)  # K x n view of a sample-major buffer, as the engine's
    return module, a, g


@needs_kernel
@pytest.mark.parametrize("conv,hw", CONVS)
@pytest.mark.parametrize("K", [1, 3])
def test_kernel_matches_float64_weight_gradients(conv, hw, K):
    """l1 and squared l2 of every per-sample, per-cotangent weight gradient, with and without an offset."""
    module, a, g = layer(conv, hw, K)
    off = torch.randn_like(module.weight)
    reds = [("l1", off), ("l2sq", None), ("l2sq", off), ("l1", None)]
    got = conv_kernel.weight_norms(module, *engine.ConvRule._padded(module, a), g, reds)
    assert got is not None and got.shape == (4, K, a.shape[0]) and got.dtype == torch.float64
    assert_rel(got, float64_norms(module, a, g, reds))


@needs_kernel
def test_kernel_in_chunks_of_output_gradients_matches_float64():
    """Output gradients larger than the kernel's L2 budget (G_BYTES = 256 KiB: 10 cotangents x 7 channels x
    32 x 32 positions) take the chunked loop (every panel packed first); same values as the float64 gradients."""
    module, a, g = layer(dict(in_channels=2, out_channels=7, kernel_size=3, padding=1), 32, 10, n=3)
    assert 10 * 7 * 32 * 32 * 4 > 256 * 1024
    off = torch.randn_like(module.weight)
    reds = [("l1", None), ("l2sq", off)]
    got = conv_kernel.weight_norms(module, a, [1, 1], g, reds)
    assert_rel(got, float64_norms(module, a, g, reds))


@needs_kernel
def test_kernel_values_do_not_depend_on_threads_or_layouts():
    """Samples split over 1 or 3 threads, channels-last input, non-contiguous gradients: bitwise equal values."""
    module, a, g = layer(CONVS[2][0], CONVS[2][1], 3, n=7)
    reds = [("l1", None), ("l2sq", torch.randn_like(module.weight))]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = conv_kernel.weight_norms(module, a, [1, 2], g, reds)
        torch.set_num_threads(3)
        three = conv_kernel.weight_norms(module, a, [1, 2], g, reds)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, three)
    other = conv_kernel.weight_norms(module, a.contiguous(memory_format=torch.channels_last), [1, 2],
                                     g.contiguous(), reds)
    assert torch.equal(one, other)


@needs_kernel
def test_engine_takes_the_kernel_and_matches_per_sample_autograd(monkeypatch):
    """A float32 CNN through the engine: every convolution weight by the kernel (torch's per-sample kernel and
    the blocked path never run), l1, l2sq and BatchGrad's offset against one backward per (sample, label) in
    float64 on the same weights."""
    def boom(*a, **k):
        raise AssertionError("torch's per-sample convolution kernel ran")

    monkeypatch.setattr(engine.ConvRule, "_per_sample_weight_grads", staticmethod(boom))
    monkeypatch.setattr(engine.ConvRule, "reduce_blocked", staticmethod(boom))
    monkeypatch.setattr(engine, "GHOST_FACTOR", float("inf"))
    monkeypatch.setattr(engine, "GHOST_FACTOR_COMPILED", float("inf"))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 7, 3, stride=2), nn.ReLU(),
                          nn.Flatten(), nn.Linear(7 * 2 * 2, 4)).eval()
    x = torch.randn(6, 2, 6, 6)
    offsets = {id(p): 0.01 * torch.randn_like(p) for p in model.parameters()}
    groups = [RowGroup(label_cot, (Reduction("l1"), Reduction("l2sq"), Reduction("l1", offsets)))]
    (got,), _ = per_sample_grad_reductions(model, x, groups, batch_size=4)
    m64 = copy.deepcopy(model).double()
    off64 = {id(p64): offsets[id(p)].double() for p, p64 in zip(model.parameters(), m64.parameters())}
    for j, (nm, off) in enumerate([("l1", None), ("l2sq", None), ("l1", off64)]):
        assert_rel(got[j], naive_norms(m64, x.double(), label_cot, nm, offsets=off))


def test_scores_equal_with_and_without_the_kernel(monkeypatch):
    """Deep GradNorm and ExGrad on a float32 CNN: the kernel's values and torch's kernel's agree to 1e-6."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 10, 3), nn.ReLU(),
                          nn.Flatten(), nn.Linear(10 * 4 * 4, 5)).eval()
    x = torch.randn(5, 3, 6, 6)
    scores = [get_score("gradnorm(depth=deep)"), get_score("exgrad(depth=deep)")]
    with_kernel = [sc.from_model(model, x) for sc in scores]
    monkeypatch.setattr(conv_kernel, "ENABLED", False)
    assert conv_kernel.tag() == "torch"
    for sc, v in zip(scores, with_kernel):
        assert_rel(v, sc.from_model(model, x))


def test_a_failed_build_falls_back_with_a_warning(monkeypatch, tmp_path, caplog):
    """A compiler that fails: one warning naming the reason, None from weight_norms, "torch" in cache keys."""
    monkeypatch.setattr(conv_kernel, "_state", {})
    monkeypatch.setattr(conv_kernel, "ENABLED", True)
    monkeypatch.setenv("UVOOD_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    module, a, g = layer(CONVS[0][0], CONVS[0][1], 1)
    with caplog.at_level(logging.WARNING, logger="uvood.scores.conv_kernel"):
        assert conv_kernel.weight_norms(module, a, [1, 1], g, [("l1", None)]) is None
        assert conv_kernel.weight_norms(module, a, [1, 1], g, [("l1", None)]) is None
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and "building conv_kernel.c failed" in warned[0] and "false failed" in warned[0]
    assert conv_kernel.tag() == "torch"
    assert not list((tmp_path / "native").glob("*"))  # no half-written library left behind


def test_layers_the_kernel_does_not_cover_take_torch():
    """Grouped, 1-D and float64 convolutions: None (the engine's torch path)."""
    grouped = nn.Conv2d(4, 4, 3, groups=2)
    a = torch.randn(2, 4, 5, 5)
    g = torch.randn(1, 2, 4, 3, 3)
    assert conv_kernel.weight_norms(grouped, a, [0, 0], g, [("l1", None)]) is None
    double = nn.Conv2d(4, 4, 3).double()
    assert conv_kernel.weight_norms(double, a.double(), [0, 0], g.double(), [("l1", None)]) is None
    one_d = nn.Conv1d(4, 4, 3)
    assert conv_kernel.weight_norms(one_d, torch.randn(2, 4, 5), [0], torch.randn(1, 2, 4, 3), [("l1", None)]) is None
