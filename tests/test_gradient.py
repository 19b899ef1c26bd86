"""Gradient scores: every fast path (closed forms, engine) against the textbook reference.

The reference (uvood.scores.reference) runs one loss.backward() per (sample, label) on a float64
copy of the model; fast paths must agree to 1e-6 relative on float64 models.
"""

from __future__ import annotations

import csv
import itertools
from pathlib import Path

import pytest
import torch
from torch import nn

from uvood.errors import UvoodError
from uvood.model import eval_mode, forward_features
from uvood.scores import get_score, list_scores
from uvood.scores.engine import per_sample_grad_norms
from uvood.scores.gradient import (
    exgrad_shallow,
    grad_shallow,
    gradnorm_shallow,
    label_coefficients,
    orientation,
)
from uvood.scores.reference import (
    official_gradnorm_loop,
    per_sample_label_gradients,
    reference_batchgrad,
    reference_grad_score,
    score_from_gradients,
)

REPO = Path(__file__).resolve().parents[1]
COMBOS = [c for c in itertools.product(("uniform", "predicted"), ("norm_of_mean", "mean_of_norm"), ("l1", "l2sq"),
                                       ("none", "logp_over_p")) if not (c[0] == "uniform" and c[3] == "logp_over_p")]


def _randomize_bn(model):
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2.0)
            if m.affine:
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.uniform_(-0.5, 0.5)
    return model


def mlp(C, bias=True):
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 9), nn.ReLU(), nn.Dropout(0.3), nn.Linear(9, 7), nn.Tanh(),
                         nn.Linear(7, C, bias=bias))


def cnn(C, bias=True):
    return _randomize_bn(nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 5, 3, padding=1, bias=False), nn.BatchNorm2d(5, affine=False), nn.ReLU(),
        nn.Flatten(), nn.Linear(5 * 9, C, bias=bias)))


def make(arch, C, bias, n=4, dtype=torch.float64):
    model = (mlp if arch == "mlp" else cnn)(C, bias).to(dtype)
    x = torch.randn(n, 12) if arch == "mlp" else torch.randn(n, 2, 6, 6)
    return model, 2.0 * x.to(dtype)


def spec_of(label, agg, norm, weight, depth, T, bias=False):
    extra = ",bias=true" if bias else ""
    return f"grad(label={label},agg={agg},norm={norm},weight={weight},depth={depth},T={T}{extra})"


def assert_rel(a, b, rtol=1e-6):
    a, b = a.detach().to(torch.float64), b.detach().to(torch.float64)
    err = ((a - b).abs() / b.abs().clamp_min(1e-300)).max().item()
    assert err <= rtol, f"max relative error {err:.2e} > {rtol:.0e}\n{a}\n{b}"


# ---------------------------------------------------------------- every fast path vs the reference


@pytest.mark.parametrize("arch,C,T,bias", [("mlp", 3, 0.7, True), ("mlp", 17, 2.0, False),
                                           ("cnn", 10, 0.7, False), ("cnn", 3, 2.0, True)])
def test_all_axes_match_reference(arch, C, T, bias):
    """Shallow closed forms and the deep engine vs one backward per (sample, label), float64."""
    model, x = make(arch, C, bias)
    model.train()  # the scores must run it in eval mode (dropout off, BN running stats) and restore it
    for depth in ("shallow", "deep"):
        use_bias = bias and depth == "shallow"
        per_sample = per_sample_label_gradients(model, x, depth=depth, T=T, bias=use_bias)
        for label, agg, norm, weight in COMBOS:
            score = get_score(spec_of(label, agg, norm, weight, depth, T, use_bias))
            assert score.needs_model == (depth == "deep")
            got = score.from_model(model, x)
            ref = score_from_gradients(per_sample, label=label, agg=agg, norm=norm, weight=weight)
            if label == "predicted" and agg == "norm_of_mean" and weight == "none":
                # score-function identity: identically zero, float64 round-off only
                scale = score_from_gradients(per_sample, label=label, agg="mean_of_norm", norm=norm).abs()
                assert (got.abs() <= 1e-10 * scale).all() and (ref.abs() <= 1e-10 * scale).all()
            else:
                assert_rel(got, ref)
    assert model.training and all(m.training for m in model.modules())


def test_shallow_closed_forms_written_out():
    """Eq. 4, Eq. 5, the l2sq forms and uniform-label ExGrad, as written in the docs."""
    g = torch.Generator().manual_seed(1)
    h = torch.randn(6, 11, generator=g, dtype=torch.float64).relu()
    z = 3 * torch.randn(6, 7, generator=g, dtype=torch.float64)
    for T in (0.7, 2.0):
        p = torch.softmax(z / T, 1)
        C = z.shape[1]
        h1, h2 = h.abs().sum(1), (h * h).sum(1)
        sq = (p * p).sum(1)
        expected = {
            ("uniform", "norm_of_mean", "l1"): h1 * (1 / C - p).abs().sum(1) / T,  # Eq. 4
            ("predicted", "mean_of_norm", "l1"): 2 / T * h1 * (p * (1 - p)).sum(1),  # Eq. 5
            ("predicted", "mean_of_norm", "l2sq"): h2 * (1 - sq) / T**2,
            ("uniform", "mean_of_norm", "l1"): 2 / T * h1 * (1 - 1 / C),  # independent of p
            ("uniform", "mean_of_norm", "l2sq"): h2 * (1 - 2 / C + sq) / T**2,
            ("uniform", "norm_of_mean", "l2sq"): h2 * ((1 / C - p) ** 2).sum(1) / T**2,
        }
        for (label, agg, norm), value in expected.items():
            torch.testing.assert_close(grad_shallow(h, z, label=label, agg=agg, norm=norm, T=T), value)
        torch.testing.assert_close(gradnorm_shallow(h, z, T), expected[("uniform", "norm_of_mean", "l1")])
        torch.testing.assert_close(exgrad_shallow(h, z, T), -expected[("predicted", "mean_of_norm", "l1")])
        logp = torch.log_softmax(z / T, 1)
        torch.testing.assert_close(
            grad_shallow(h, z, label="predicted", agg="mean_of_norm", norm="l2sq", weight="logp_over_p", T=T),
            h2 * (logp * (1 - 2 * p + sq[:, None])).sum(1) / T**2)
        # bias=true: h augmented with a 1
        torch.testing.assert_close(grad_shallow(h, z, bias=True, T=T),
                                   (h1 + 1) * (1 / C - p).abs().sum(1) / T)


def test_score_function_identity():
    """||E_{Y~p}[grad log p^(Y)]|| = 0: autograd, the closed form and the engine all give round-off."""
    model, x = make("mlp", 10, True)
    model.eval()
    params = list(model.parameters())
    for n in range(x.shape[0]):
        logp = torch.log_softmax(model(x[n:n + 1]), 1)[0]
        p = logp.detach().exp()
        grads = torch.autograd.grad((p * logp).sum(), params, retain_graph=True)  # grad of sum_k sg(p_k) log p_k
        total = sum(g.abs().sum() for g in grads)
        single = sum(g.abs().sum() for g in torch.autograd.grad(logp[0], params))
        assert total <= 1e-13 * single
    for depth in ("shallow", "deep"):
        s = get_score(f"grad(label=predicted,agg=norm_of_mean,depth={depth})").from_model(model, x)
        assert s.abs().max() < 1e-13


def test_float32_model_close_to_float64_reference():
    model, x = make("cnn", 10, True, dtype=torch.float32)
    for spec, kw in (("gradnorm(depth=deep)", dict(label="uniform", agg="norm_of_mean", norm="l1")),
                     ("exgrad(depth=deep)", dict(label="predicted", agg="mean_of_norm", norm="l1")),
                     ("grad(label=uniform,agg=mean_of_norm,norm=l2sq,depth=deep)",
                      dict(label="uniform", agg="mean_of_norm", norm="l2sq"))):
        got = get_score(spec).from_model(model, x)
        assert got.dtype == torch.float64
        assert_rel(got, reference_grad_score(model, x, depth="deep", **kw), rtol=1e-4)


def test_micro_batches_do_not_change_values():
    model, x = make("cnn", 3, True, n=7)
    score = get_score("exgrad(depth=deep)")
    full = score.from_model(model, x)
    score.batch_size = 3
    torch.testing.assert_close(score.from_model(model, x), full, rtol=1e-12, atol=0)


# ---------------------------------------------------------------- orientation and presets


def test_orientation_sign_makes_confident_outputs_score_higher():
    """orientation(label, agg, weight) against the definition "higher = more ID", from autograd, not from a table:
    for a head z = W h, the unsigned raw score of a confident p and of a nearly flat p (same h), differentiated
    with torch.autograd label by label; sign * (raw_confident - raw_flat) must be > 0 for every combination that
    depends on p (not the identically zero one, nor uniform/mean_of_norm/l1, which is (2/T)(1 - 1/C) ||h||_1)."""
    D, C = 5, 4
    h = torch.ones(D, dtype=torch.float64)

    def raw(z_target, label, agg, norm, weight):
        W = (torch.tensor(z_target, dtype=torch.float64)[:, None] / D).repeat(1, D).requires_grad_(True)
        logp = torch.log_softmax(W @ h, dim=0)
        grads = [torch.autograd.grad(logp[k], W, retain_graph=True)[0] for k in range(C)]
        p = logp.detach().exp()
        lp = logp.detach()
        coef = [(1 / C if label == "uniform" else float(p[k])) * (float(lp[k] / p[k]) if weight == "logp_over_p"
                                                                 else 1.0) for k in range(C)]
        size = (lambda g: g.abs().sum()) if norm == "l1" else (lambda g: (g * g).sum())
        if agg == "norm_of_mean":
            return float(size(sum(c * g for c, g in zip(coef, grads))))
        return float(sum(c * size(g) for c, g in zip(coef, grads)))

    for label, agg, norm, weight in COMBOS:
        if (label, agg, weight) == ("predicted", "norm_of_mean", "none") or (label, agg, norm) == (
                "uniform", "mean_of_norm", "l1"):
            continue
        gain = raw([6.0, 0, 0, 0], label, agg, norm, weight) - raw([0.2, 0, 0.1, 0], label, agg, norm, weight)
        assert orientation(label, agg, weight) * gain > 0, (label, agg, norm, weight)


def test_orientation_prefers_confident_inputs():
    """Same h: a confident p scores at least as high as a flat p (equal where V is constant)."""
    h = torch.rand(2, 5, dtype=torch.float64).abs() + 0.1
    h[1] = h[0]
    z = torch.tensor([[8.0, 0, 0, 0], [0.1, 0, 0, 0.05]], dtype=torch.float64)  # confident, nearly flat
    for label, agg, norm, weight in COMBOS:
        s = get_score(spec_of(label, agg, norm, weight, "shallow", 1.0)).from_features(h, z)
        if label == "predicted" and agg == "norm_of_mean" and weight == "none":
            assert s.abs().max() < 1e-12
        elif label == "uniform" and agg == "mean_of_norm" and norm == "l1":
            torch.testing.assert_close(s[0], s[1])  # V = 2(1 - 1/C): only ||h|| matters
        else:
            assert s[0] > s[1], (label, agg, norm, weight)


def test_presets_are_grad_combinations():
    model, x = make("mlp", 5, True)
    pairs = [("gradnorm", "grad(label=uniform,agg=norm_of_mean,norm=l1)"),
             ("exgrad(T=2,bias=true)", "grad(label=predicted,agg=mean_of_norm,norm=l1,T=2,bias=true)"),
             ("gradnorm(depth=deep)", "grad(depth=deep)"),
             ("exgrad(depth=deep)", "grad(label=predicted,agg=mean_of_norm,depth=deep)")]
    for a, b in pairs:
        torch.testing.assert_close(get_score(a).from_model(model, x), get_score(b).from_model(model, x))
    assert get_score("grad(depth=deep, agg=mean_of_norm)").spec == "grad(agg=mean_of_norm,depth=deep)"
    assert {"grad", "gradnorm", "exgrad", "batchgrad"} <= set(list_scores())


def test_official_gradnorm_constant():
    """gradnorm(official=true): the official code's loss sum_k -log p_k (targets of ones) = C x Eq. 4."""
    model, x = make("cnn", 10, True)
    for T in (1.0, 2.0):
        official = get_score(f"gradnorm(official=true,T={T})").from_model(model, x)
        assert_rel(official, official_gradnorm_loop(model, x, T=T))
        assert_rel(official, 10 * get_score(f"gradnorm(T={T})").from_model(model, x))
    deep = get_score("grad(official=true,depth=deep)").from_model(model, x)
    assert_rel(deep, 10 * get_score("gradnorm(depth=deep)").from_model(model, x))


def _paper_specs():
    """The gradient rows of the paper's values (the project's copy of shared/paper/paper_values.csv)."""
    with open(REPO / "src" / "uvood" / "bench" / "paper_values.csv") as f:
        return sorted({(r["spec"], r["depth"]) for r in csv.DictReader(f) if r["depth"] in ("deep", "shallow")})


def _with_depth(spec, depth):
    return spec[:-1] + f",depth={depth})" if spec.endswith(")") else f"{spec}(depth={depth})"


TABLE1 = ["grad(label=predicted,agg=norm_of_mean,norm=l2sq)", "grad(label=uniform,agg=mean_of_norm,norm=l1)",
          "grad(label=uniform,agg=mean_of_norm,norm=l2sq)", "gradnorm",
          "grad(label=predicted,agg=mean_of_norm,norm=l2sq,weight=logp_over_p)",
          "grad(label=predicted,agg=mean_of_norm,norm=l2sq)", "exgrad", "batchgrad"]


def test_paper_specs_parse():
    """Every gradient row of the paper's values (Table 1, Table 3) is a valid spec at both depths."""
    rows = _paper_specs() or [(s, d) for s in TABLE1 for d in ("deep", "shallow")]
    assert {s for s, _ in rows} >= set(TABLE1) or not _paper_specs()
    for spec, depth in rows:
        score = get_score(_with_depth(spec, depth))
        assert score.needs_model == (depth == "deep"), spec


# ---------------------------------------------------------------- BatchGrad (Eq. 6)


@pytest.mark.parametrize("depth,arch", [("shallow", "cnn"), ("deep", "cnn"), ("deep", "mlp")])
def test_batchgrad_matches_reference(depth, arch):
    C = 4
    model, x = make(arch, C, True, n=3)
    xtr = make(arch, C, True, n=30)[1]
    ytr = torch.arange(30) % C
    score = get_score(f"batchgrad(depth={depth},T=0.7,seed=3)")
    assert score.needs_fit and score.needs_model == (depth == "deep")
    score.fit(model, xtr, ytr)
    assert score.anchor_y.tolist() == list(range(C))
    assert all(int(ytr[(xtr == a).flatten(1).all(1)][0]) == c for c, a in enumerate(score.anchor_x))
    got = score.from_model(model, x)
    assert_rel(got, reference_batchgrad(model, x, score.anchor_x, score.anchor_y, depth=depth, T=0.7))
    assert (got < 0).all()
    # state round trip: a fresh score with the saved tensors gives the same values
    fresh = get_score(f"batchgrad(depth={depth},T=0.7,seed=3)")
    fresh.load_state({k: v.clone() for k, v in score.state().items()})
    torch.testing.assert_close(fresh.from_model(model, x), got)
    # the anchors are seeded
    again = get_score(f"batchgrad(depth={depth},T=0.7,seed=3)")
    again.fit(model, xtr, ytr)
    assert torch.equal(again.anchor_x, score.anchor_x)


def test_batchgrad_anchor_gradient_follows_parameter_updates():
    model, x = make("mlp", 3, True, n=3)
    ytr = torch.arange(12) % 3
    xtr = make("mlp", 3, True, n=12)[1]
    score = get_score("batchgrad(depth=deep)")
    score.fit(model, xtr, ytr)
    before = score.from_model(model, x)
    with torch.no_grad():
        model[1].weight.mul_(1.5)
    after = score.from_model(model, x)
    assert not torch.allclose(before, after)
    assert_rel(after, reference_batchgrad(model, x, score.anchor_x, score.anchor_y, depth="deep"))


def test_batchgrad_errors():
    model, x = make("mlp", 3, True)
    score = get_score("batchgrad")
    with pytest.raises(UvoodError, match="fitted"):
        score.from_features(torch.randn(2, 7), torch.randn(2, 3))
    with pytest.raises(UvoodError, match="labelled"):
        score.fit(model, x, None)
    with pytest.raises(UvoodError, match=r"class\(es\) \[2\]"):
        score.fit(model, x, torch.tensor([0, 1, 0, 1]))
    with pytest.raises(UvoodError, match="anchor_grad"):
        score.load_state({"anchor_x": x[:3], "anchor_y": torch.arange(3)})


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("spec, message", [
    ("grad(label=sideways)", "label='sideways' is not valid; choose one of uniform, predicted"),
    ("grad(agg=max)", "norm_of_mean, mean_of_norm"),
    ("exgrad(depth=medium)", "shallow, deep"),
    ("grad(weight=logp_over_p)", "label=predicted"),
    ("grad(label=predicted,official=true)", "label=uniform"),
    ("gradnorm(depth=deep,bias=true)", "Drop bias=true"),
    ("exgrad(T=0)", "T must be"),
    ("exgrad(official=true)", "no parameter 'official'"),
])
def test_bad_specs_are_clear(spec, message):
    with pytest.raises(UvoodError, match=message):
        get_score(spec)


def test_head_not_found():
    class NoHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(12, 3))

        def forward(self, x):
            return x @ self.w

    x = torch.randn(3, 12)
    for spec in ("gradnorm", "gradnorm(depth=deep)", "exgrad(depth=deep)"):
        with pytest.raises(UvoodError, match="head"):
            get_score(spec).from_model(NoHead(), x)


def test_bias_true_needs_a_head_bias():
    model, x = make("mlp", 3, bias=False)
    with pytest.raises(UvoodError, match="has no bias"):
        get_score("gradnorm(bias=true)").from_model(model, x)
    with pytest.raises(UvoodError, match="has no bias"):
        get_score("batchgrad(bias=true)").fit(model, x, torch.arange(x.shape[0]) % 3)


def relu_head_model(C):
    """A ReLU encoder whose first input (all zeros) gets h = 0 exactly, as some OOD images do under the zoo's
    MNIST model; the others get h != 0."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 7), nn.ReLU(), nn.Linear(7, C)).double()
    with torch.no_grad():
        model[1].bias.fill_(-0.1)
    x = torch.cat([torch.zeros(1, 12), 2 * torch.randn(5, 12)]).double()
    h, z = forward_features(model, x)
    assert (h[0] == 0).all() and (h[1:].abs().sum(1) > 0).all()
    return model, x, h, z


def test_degenerate_encoding_h_zero():
    """h = 0: every weight-only shallow gradient is exactly 0 (the negated ExGrad then ranks it most ID); with the
    head's bias (the authors' definition, h~ = [h, 1]) each closed form matches autograd in float64 there too."""
    C, T = 5, 0.7
    model, x, h, z = relu_head_model(C)
    for bias in (False, True):
        per_sample = per_sample_label_gradients(model, x, depth="shallow", T=T, bias=bias)
        for label, agg, norm, weight in COMBOS:
            if label == "predicted" and agg == "norm_of_mean" and weight == "none":
                continue  # identically zero for every input (test_score_function_identity)
            score = get_score(spec_of(label, agg, norm, weight, "shallow", T, bias))
            got = score.from_model(model, x)
            assert_rel(got, score_from_gradients(per_sample, label=label, agg=agg, norm=norm, weight=weight))
            assert (got[0] != 0) if bias else (got[0] == 0), (label, agg, norm, weight, bias)
    exgrad_w = get_score("exgrad(T=0.7)").from_model(model, x)
    assert exgrad_w[0] == 0 and (exgrad_w[1:] < 0).all()  # the degenerate input is the "most ID" one
    p = torch.softmax(z / T, 1)
    torch.testing.assert_close(get_score("exgrad(T=0.7,bias=true)").from_model(model, x)[0],
                               -(2 / T) * (1 + h[0].abs().sum()) * (p[0] * (1 - p[0])).sum())
    # and every ||h||_p * V product is 0 there, whatever V says
    for spec in ("norm(1)*energy", "norm(0.3)*msp", "norm(inf)*varsum"):
        assert get_score(spec).from_model(model, x)[0] == 0


@pytest.mark.parametrize("bias", [False, True])
def test_shallow_batchgrad_with_bias_matches_reference_at_h_zero(bias):
    C = 4
    model, x, _, _ = relu_head_model(C)
    xtr = 2 * torch.randn(20, 12, dtype=torch.float64)
    ytr = torch.arange(20) % C
    score = get_score(f"batchgrad(T=0.7,seed=1,bias={str(bias).lower()})")
    score.fit(model, xtr, ytr)
    assert score.anchor_grad.shape == (C, 7 + bias)
    got = score.from_model(model, x)
    assert_rel(got, reference_batchgrad(model, x, score.anchor_x, score.anchor_y, depth="shallow", T=0.7, bias=bias))
    fresh = get_score(f"batchgrad(T=0.7,seed=1,bias={str(bias).lower()})")
    fresh.load_state({k: v.clone() for k, v in score.state().items()})
    torch.testing.assert_close(fresh.from_model(model, x), got)


def test_deep_scores_need_the_model():
    with pytest.raises(UvoodError, match="needs the model"):
        get_score("exgrad(depth=deep)").from_features(torch.randn(2, 7), torch.randn(2, 3))


def test_train_mode_batchnorm_is_scored_in_eval_mode():
    """The score objects switch to eval mode (and restore the flags); the engine itself refuses."""
    model, x = make("cnn", 3, True)
    model.eval()
    expected = get_score("gradnorm(depth=deep)").from_model(model, x)
    model.train()
    torch.testing.assert_close(get_score("gradnorm(depth=deep)").from_model(model, x), expected)
    assert model[1].training
    with pytest.raises(UvoodError, match="training mode.*couples the samples"):
        per_sample_grad_norms(model, x, lambda z: z[None] * 0)


def test_label_coefficients():
    z = torch.randn(3, 4, dtype=torch.float64)
    torch.testing.assert_close(label_coefficients(z, "uniform"), torch.full((3, 4), 0.25, dtype=torch.float64))
    torch.testing.assert_close(label_coefficients(z, "uniform", official=True), torch.ones(3, 4, dtype=torch.float64))
    p = torch.softmax(z / 2, 1)
    torch.testing.assert_close(label_coefficients(z, "predicted", T=2), p)
    torch.testing.assert_close(label_coefficients(z, "predicted", "logp_over_p", T=2), p * (p.log() / p))


def test_shallow_scores_from_cached_features_equal_from_model():
    model, x = make("cnn", 10, True)
    with torch.no_grad(), eval_mode(model):
        h, z = forward_features(model, x)
    for spec in ("gradnorm", "exgrad(T=0.7)", "grad(label=uniform,agg=mean_of_norm,norm=l2sq,bias=true)"):
        score = get_score(spec)
        assert not score.needs_model
        torch.testing.assert_close(score.from_features(h, z), score.from_model(model, x))


@pytest.mark.parametrize("spec", ["batchgrad", "batchgrad(depth=deep)", "exgrad(depth=deep)"])
def test_detector_fit_save_load(spec, tmp_path):
    """Deep and fitted gradient scores through uvood.Detector, including save / load of the anchors."""
    from uvood.detector import Detector

    model, x = make("cnn", 3, True, n=12, dtype=torch.float32)
    y = torch.arange(12) % 3
    det = Detector(model, score=spec, batch_size=5).fit((x, y))
    scores = det.score(x)
    assert scores.shape == (12,) and scores.dtype == torch.float64
    det.save(tmp_path / "det.pt")
    loaded = Detector.load(tmp_path / "det.pt", model)
    torch.testing.assert_close(loaded.score(x), scores)
