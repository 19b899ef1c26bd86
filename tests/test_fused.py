"""The fused deep pass (uvood.scores.fused) and the engine's row groups against the float64 references."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from test_engine import label_cot, naive_norms
from test_gradient import COMBOS, assert_rel, make, spec_of
from uvood.errors import UvoodError
from uvood.scores import conv_kernel, engine, fused, get_score
from uvood.scores.engine import Reduction, RowGroup, per_sample_grad_norms, per_sample_grad_reductions
from uvood.scores.reference import (
    per_sample_label_gradients,
    reference_batchgrad,
    score_from_gradients,
)


def fitted_batchgrad(spec, model, arch, C):
    sc = get_score(spec)
    xtr = make(arch, C, True, n=24)[1]
    sc.fit(model, xtr, torch.arange(24) % C)
    return sc


@pytest.mark.parametrize("arch,C,T", [("cnn", 4, 0.7), ("mlp", 5, 1.0)])
def test_deep_pass_matches_float64_reference(arch, C, T):
    """Every deep grad row, two BatchGrads (other seeds, other T) and the per-label norms, from one pass,
    each against one loss.backward() per (sample, label) in float64."""
    model, x = make(arch, C, True, n=5)
    specs = [spec_of(label, agg, norm, weight, "deep", T) for label, agg, norm, weight in COMBOS]
    scores = [get_score(s) for s in specs]
    bgs = [fitted_batchgrad(f"batchgrad(depth=deep,T={T},seed=1)", model, arch, C),
           fitted_batchgrad("batchgrad(depth=deep,T=2,seed=2)", model, arch, C)]
    out = fused.deep_pass(model, x, scores + bgs, label_norms=(T,), batch_size=3)
    per_sample = per_sample_label_gradients(model, x, depth="deep", T=T)
    for sc, (label, agg, norm, weight) in zip(scores, COMBOS):
        got = out.scores[sc.spec]
        if (label, agg, weight) == ("predicted", "norm_of_mean", "none"):
            assert torch.equal(got, torch.zeros(x.shape[0], dtype=torch.float64))  # closed form
            continue
        assert_rel(got, score_from_gradients(per_sample, label=label, agg=agg, norm=norm, weight=weight))
    for bg in bgs:
        assert_rel(out.scores[bg.spec], reference_batchgrad(model, x, bg.anchor_x, bg.anchor_y, depth="deep", T=bg.T))
    for nm in ("l1", "l2sq"):
        ref = torch.tensor([[sum(float(g.abs().sum() if nm == "l1" else (g * g).sum()) for g in grads[k])
                             for _, grads in per_sample] for k in range(C)], dtype=torch.float64)
        assert_rel(out.label_norms[T][nm], ref)


def test_deep_pass_equals_each_scores_own_path():
    """The fused values are those of each score's from_model (float64: to round-off)."""
    model, x = make("cnn", 3, True, n=4)
    specs = ["gradnorm(depth=deep)", "exgrad(depth=deep)", "grad(label=uniform,agg=mean_of_norm,norm=l2sq,depth=deep)",
             "grad(label=predicted,agg=norm_of_mean,norm=l2sq,depth=deep)"]
    scores = [get_score(s) for s in specs] + [fitted_batchgrad("batchgrad(depth=deep)", model, "cnn", 3)]
    out = fused.deep_pass(model, x, scores)
    for sc in scores:
        torch.testing.assert_close(out.scores[sc.spec], sc.from_model(model, x), rtol=1e-10, atol=0)


def test_identically_zero_score_needs_no_pass(monkeypatch):
    """The predicted-label norm-of-mean rows are 0 from their closed form: no forward, no backward."""

    def boom(*a, **k):
        raise AssertionError("a deep pass ran")

    monkeypatch.setattr(fused, "per_sample_grad_reductions", boom)
    monkeypatch.setattr(engine, "per_sample_grad_reductions", boom)
    model, x = make("cnn", 3, True, n=4)
    for spec in ("grad(label=predicted,agg=norm_of_mean,norm=l2sq,depth=deep)",
                 "grad(label=predicted,agg=norm_of_mean,norm=l1,depth=deep,T=2)"):
        sc = get_score(spec)
        out = fused.deep_pass(model, x, [sc])
        assert torch.equal(out.scores[sc.spec], torch.zeros(4, dtype=torch.float64))
        assert torch.equal(sc.from_model(model, x), torch.zeros(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="deep grad and BatchGrad"):
        fused.deep_pass(model, x, [get_score("energy")])


def test_label_rows_form_each_conv_gradient_once(monkeypatch):
    """ExGrad, the l2sq label norms and BatchGrad share the C label rows: each conv's per-sample weight
    gradients are formed once per (sample, label chunk), not once per score."""
    model, x = make("cnn", 3, True, n=4)
    calls = []
    orig = engine.ConvRule._per_sample_weight_grads

    def counting(module, a, g):
        for item in orig(module, a, g):
            calls.append(1)
            yield item

    monkeypatch.setattr(engine.ConvRule, "_per_sample_weight_grads", staticmethod(counting))
    bg = fitted_batchgrad("batchgrad(depth=deep)", model, "cnn", 3)
    fused.deep_pass(model, x, [get_score("exgrad(depth=deep)"), bg], label_norms=(1.0,))
    n_conv = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert len(calls) == n_conv * x.shape[0]


def test_row_groups_and_offset_reductions_match_naive():
    """Reductions with and without an offset in one group, and a second group, against autograd per sample."""
    model, x = make("cnn", 3, True, n=5)
    model.eval()
    torch.manual_seed(0)
    offsets = {id(p): torch.randn_like(p) for p in list(model.parameters())[::2]}
    combo = lambda z: (torch.full_like(z, 1 / 3) - torch.softmax(z, 1))[None]  # noqa: E731
    groups = [RowGroup(label_cot, (Reduction("l1"), Reduction("l2sq"), Reduction("l1", offsets),
                                   Reduction("l2sq", offsets))),
              RowGroup(combo, (Reduction("l2sq"), Reduction("l1")))]
    (a, b), _ = per_sample_grad_reductions(model, x, groups, batch_size=2, max_rows=4)
    for j, (nm, off) in enumerate([("l1", None), ("l2sq", None), ("l1", offsets), ("l2sq", offsets)]):
        assert_rel(a[j], naive_norms(model, x, label_cot, nm, offsets=off))
    for j, nm in enumerate(("l2sq", "l1")):
        assert_rel(b[j], naive_norms(model, x, combo, nm))
    # the single-group wrapper is the same computation
    one, _ = per_sample_grad_norms(model, x, label_cot, norm="l1", offsets=offsets, batch_size=2, max_rows=4)
    torch.testing.assert_close(one, a[2], rtol=1e-12, atol=0)


def test_score_model_with_several_specs_uses_one_deep_pass(monkeypatch):
    """score_model([...]) returns each spec's values as one-spec calls do, with ONE engine pass per batch."""
    from uvood import score_model

    model, x = make("cnn", 3, True, n=6)
    bg = fitted_batchgrad("batchgrad(depth=deep,T=2)", model, "cnn", 3)
    specs = ["gradnorm(depth=deep)", "exgrad(depth=deep)", bg, "energy", "norm(1)*msp", "odin", "exgrad",
             "grad(label=predicted,agg=norm_of_mean,norm=l2sq,depth=deep)"]
    single = {get_score(s).spec: score_model(s, model, x, batch_size=4, progress=False) for s in specs}
    calls = []
    orig = fused.per_sample_grad_reductions
    monkeypatch.setattr(fused, "per_sample_grad_reductions", lambda *a, **k: calls.append(1) or orig(*a, **k))
    many = score_model(specs, model, x, batch_size=4, progress=False)
    assert list(many) == list(single) and len(calls) == 2  # 6 samples in batches of 4
    for name, values in single.items():
        torch.testing.assert_close(many[name], values, rtol=1e-10, atol=0)
    with pytest.raises(UvoodError, match="empty list of specs"):
        score_model([], model, x)


@pytest.mark.parametrize("conv,hw", [(dict(padding=1), 6), (dict(stride=2, dilation=2, padding=2), 9),
                                     (dict(padding="same", padding_mode="reflect"), 5), (dict(padding=0), 4)])
def test_ghost_norm_equals_the_per_sample_gradient(conv, hw):
    """||sum_t g_t a_t^T||^2 by the ghost identity equals the squared norm of the formed per-sample gradient."""
    torch.manual_seed(0)
    module = nn.Conv2d(3, 4, 3, **conv).double()
    a = torch.randn(5, 3, hw, hw, dtype=torch.float64)
    out = module(a)
    g = torch.randn(2, *out.shape, dtype=torch.float64)
    formed = engine.ConvRule().grad_sample(module, (a,), {}, g, ["weight"])["weight"]
    torch.testing.assert_close(engine.ConvRule.ghost_l2sq(module, a, g), (formed ** 2).flatten(2).sum(-1),
                               rtol=1e-10, atol=0)
    cl = a.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(engine.ConvRule.ghost_l2sq(module, cl, g), (formed ** 2).flatten(2).sum(-1),
                               rtol=1e-10, atol=0)


@pytest.mark.parametrize("factor", [0.0, float("inf")])
def test_squared_l2_scores_with_and_without_ghost_match_reference(monkeypatch, factor):
    """Deep squared-l2 rows with every conv on the ghost norm (factor 0) or on the kernel (inf), float64 reference."""
    monkeypatch.setattr(engine, "GHOST_FACTOR", factor)
    model, x = make("cnn", 4, True, n=5)
    per_sample = per_sample_label_gradients(model, x, depth="deep", T=0.7)
    for label, agg, weight in [("uniform", "mean_of_norm", "none"), ("predicted", "mean_of_norm", "logp_over_p"),
                               ("uniform", "norm_of_mean", "none")]:
        got = get_score(spec_of(label, agg, "l2sq", weight, "deep", 0.7)).from_model(model, x)
        assert_rel(got, score_from_gradients(per_sample, label=label, agg=agg, norm="l2sq", weight=weight))


def test_ghost_cost_model_choice_is_logged(caplog):
    """Few output positions (late layers): ghost norm; many (first layers): the per-sample kernel; logged at debug."""
    import logging

    early, late = nn.Conv2d(3, 32, 3, padding=1), nn.Conv2d(128, 256, 3)
    with caplog.at_level(logging.DEBUG, logger="uvood.scores.engine"):
        assert not engine.ConvRule.ghost_cheaper(early, torch.zeros(8, 3, 32, 32), torch.zeros(10, 8, 32, 32, 32))
        assert engine.ConvRule.ghost_cheaper(late, torch.zeros(8, 128, 4, 4), torch.zeros(10, 8, 256, 2, 2))
    text = caplog.text
    kernel = "compiled kernel" if conv_kernel.available() else "per-sample kernel"  # float32 layers: compiled
    assert kernel in text and "ghost norm" in text


def test_memory_budget_sets_micro_batch_and_rows_without_changing_values(monkeypatch):
    """A tight budget gives fewer samples and cotangents per chunk, a large one all of them; the values are the same."""
    model, x = make("cnn", 5, True, n=40)
    model.eval()
    modules = [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]
    group = [RowGroup(label_cot, (Reduction("l1"),))]
    with torch.enable_grad():
        big = engine.plan_micro_batch(model, x, group, None, modules, 32, 2**30)
        small = engine.plan_micro_batch(model, x, group, None, modules, 32, 3 * engine.CHUNK_ELEMENTS * 8 + 40_000)
    assert big == (20, 20 * 5)  # 40 samples, at most 32 per micro-batch: two equal ones
    assert small[0] < 32 or small[1] < 32 * 5
    seen = []
    orig = engine._micro_batch
    monkeypatch.setattr(engine, "_micro_batch", lambda m, xb, *a: seen.append(xb.shape[0]) or orig(m, xb, *a))
    tight, _ = per_sample_grad_norms(model, x, label_cot, max_memory=3 * engine.CHUNK_ELEMENTS * 8 + 40_000)
    assert max(seen) == small[0]
    roomy, _ = per_sample_grad_norms(model, x, label_cot, batch_size=32)
    torch.testing.assert_close(tight, roomy, rtol=1e-12, atol=0)
    assert_rel(roomy, naive_norms(model, x, label_cot, "l1"))


def test_plan_counts_per_sample_memory_only():
    """The planner's bytes per sample exclude the parameters autograd saves (not per sample: here 24 MB) and count
    a view of the input by its own size; the micro-batches are equal."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(3000, 2000), nn.ReLU(), nn.Linear(2000, 3)).eval()  # 24 MB weight
    modules = [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]
    x = torch.randn(64, 3000)
    group = [RowGroup(label_cot, (Reduction("l1"),))]
    # per sample: act = input 12000 B (the view x[:2] counts 2 samples, not x) + hidden 8000 (Linear output) +
    # 8000 (ReLU output) + logits 12; row = 8000 + 12; 3 cotangents: act + 4 rows = 60060 B; weights not counted
    budget = 3 * engine.CHUNK_ELEMENTS * 4 + 24 * 60060  # 24 samples
    with torch.enable_grad():
        n, rows = engine.plan_micro_batch(model, x, group, None, modules, 64, budget)
    assert (n, rows) == (22, 22 * 3)  # 64 samples in three equal micro-batches, not 24 + 24 + 16


def test_max_memory_option_parses_sizes():
    import argparse

    from uvood.bench.cli import memory_size

    assert memory_size("2G") == 2 * 2**30 and memory_size("500m") == 500 * 2**20 and memory_size("1.5GB") == 3 * 2**29
    assert memory_size("4096") == 4096
    with pytest.raises(argparse.ArgumentTypeError, match="is not a size"):
        memory_size("lots")


@pytest.mark.parametrize("conv,hw", [(dict(padding=1), 6), (dict(stride=2, dilation=2, padding=2), 9),
                                     (dict(padding="same", padding_mode="reflect"), 5), (dict(padding=0), 4)])
@pytest.mark.parametrize("block", [1, 7, 3 * 9 * 4, 10**9])
def test_blocked_conv_reduction_equals_the_per_sample_kernel(monkeypatch, conv, hw, block):
    """Per-sample weight-gradient norms formed in cache-sized blocks (labels x channels x patch, any block size,
    offsets included) equal those of the convolution's own per-sample kernel, float64 to round-off."""
    torch.manual_seed(0)
    module = nn.Conv2d(3, 5, 3, **conv).double()
    a = torch.randn(4, 3, hw, hw, dtype=torch.float64)
    out = module(a)
    g = torch.randn(out.shape[0], 3, *out.shape[1:], dtype=torch.float64).transpose(0, 1)  # sample-major, K = 3
    off = torch.randn_like(module.weight)
    reds = [("l1", off), ("l2sq", None), ("l2sq", off), ("l1", None)]
    monkeypatch.setattr(engine, "BLOCK_ELEMENTS", 10**12)
    kernel = engine.ConvRule().reduce(module, (a,), g, "weight", reds)
    monkeypatch.setattr(engine, "BLOCK_ELEMENTS", block)
    assert engine.ConvRule.blocked(module, a, g) == (block < 3 * module.weight.numel())
    for x in (a, a.contiguous(memory_format=torch.channels_last)):
        got = engine.ConvRule.reduce_blocked(module, x, g, reds)
        torch.testing.assert_close(got, kernel, rtol=1e-10, atol=0)
    formed = engine.ConvRule().grad_sample(module, (a,), {}, g, ["weight"])["weight"]
    torch.testing.assert_close(got[0], (formed + off).abs().flatten(2).sum(-1), rtol=1e-10, atol=0)
    torch.testing.assert_close(got[1], (formed ** 2).flatten(2).sum(-1), rtol=1e-10, atol=0)


def test_blocked_conv_path_matches_float64_reference(monkeypatch):
    """The engine with every conv on the blocked path (l1, l2sq, BatchGrad's offset) against autograd per sample;
    the per-sample kernel is not called."""
    monkeypatch.setattr(engine, "BLOCK_ELEMENTS", 5)
    monkeypatch.setattr(engine, "GHOST_FACTOR", float("inf"))

    def boom(*a, **k):
        raise AssertionError("the unblocked per-sample kernel ran")

    monkeypatch.setattr(engine.ConvRule, "_per_sample_weight_grads", staticmethod(boom))
    model, x = make("cnn", 3, True, n=5)
    model.eval()
    torch.manual_seed(0)
    offsets = {id(p): torch.randn_like(p) for p in model.parameters()}
    groups = [RowGroup(label_cot, (Reduction("l1"), Reduction("l2sq"), Reduction("l1", offsets)))]
    (a,), _ = per_sample_grad_reductions(model, x, groups, batch_size=3)
    for j, (nm, off) in enumerate([("l1", None), ("l2sq", None), ("l1", offsets)]):
        assert_rel(a[j], naive_norms(model, x, label_cot, nm, offsets=off))


def test_plan_probes_a_model_once_per_input_shape(monkeypatch):
    """The planner's probe forward runs once per model and input shape; later passes plan from the kept bytes."""
    model, x = make("cnn", 3, True, n=6)
    model.eval()
    calls = []
    orig = engine.forward_head
    monkeypatch.setattr(engine, "forward_head", lambda m, xx, h: calls.append(xx.shape[0]) or orig(m, xx, h))
    first, _ = per_sample_grad_norms(model, x, label_cot, batch_size=4)
    second, _ = per_sample_grad_norms(model, x[:5], label_cot, batch_size=4)
    assert calls == [2, 3, 3, 3, 2]  # probe, 2 x 3 samples; no probe, 3 + 2
    torch.testing.assert_close(second, first[:, :5], rtol=1e-12, atol=0)
    other, _ = make("cnn", 3, True, n=4)
    per_sample_grad_norms(other.eval(), x[:4], label_cot, batch_size=4)
    assert calls[5:] == [2, 4]  # another model: probed again
