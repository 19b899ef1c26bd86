"""Every feature score against an independent float64 numpy reference; Eq. 4/5 against autograd."""

import math

import numpy as np
import pytest
import torch

import uvood
from uvood.errors import UvoodError
from uvood.scores.registry import entries, get_score


def _np_softmax(z, T=1.0):
    z = z / T
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def _np_norm(h, p):
    a = np.abs(h)
    if p == 0:
        return (a != 0).sum(1).astype(float)
    if math.isinf(p):
        return a.max(1)
    return (a ** p).sum(1) ** (1 / p)


REFERENCE = {
    "msp": lambda h, z, T=1.0: _np_softmax(z, T).max(1),
    "energy": lambda h, z, T=1.0: T * np.log(np.exp(z / T).sum(1)),
    "tv": lambda h, z, T=1.0: 0.5 * np.abs(_np_softmax(z, T) - 1 / z.shape[1]).sum(1),
    "varsum": lambda h, z, T=1.0: 1 - (_np_softmax(z, T) * (1 - _np_softmax(z, T))).sum(1),
    "maxlogit": lambda h, z: z.max(1),
    "entropy": lambda h, z, T=1.0: (_np_softmax(z, T) * np.log(_np_softmax(z, T))).sum(1),
    "gradnorm": lambda h, z, T=1.0: np.abs(h).sum(1) * np.abs(1 / z.shape[1] - _np_softmax(z, T)).sum(1) / T,
    "exgrad": lambda h, z, T=1.0: -2 / T * np.abs(h).sum(1) * (_np_softmax(z, T) * (1 - _np_softmax(z, T))).sum(1),
}


def _features(n=64, d=20, c=7, seed=0):
    g = np.random.default_rng(seed)
    h = np.maximum(g.normal(size=(n, d)), 0) * g.uniform(0.1, 5, size=(n, 1))  # ReLU-like, with zeros
    z = g.normal(size=(n, c)) * g.uniform(0.1, 6, size=(n, 1))
    return h, z


@pytest.mark.parametrize("name", sorted(REFERENCE))
@pytest.mark.parametrize("T", [1.0, 0.5, 3.0])
def test_output_and_closed_form_scores_match_numpy_reference(name, T):
    h, z = _features()
    spec = name if name == "maxlogit" or T == 1.0 else f"{name}(T={T})"
    ref = REFERENCE[name](h, z) if name == "maxlogit" else REFERENCE[name](h, z, T)
    got = uvood.score_features(spec, torch.tensor(h, dtype=torch.float32), torch.tensor(z)).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("p", [0, 0.1, 0.3, 0.5, 0.8, 1, 2, 3, 4, 5, 6, math.inf, 1.7])
def test_norm_matches_reference(p):
    h, z = _features()
    got = uvood.score_features(f"norm({p})", torch.tensor(h), torch.tensor(z)).numpy()
    np.testing.assert_allclose(got, _np_norm(h, p), rtol=1e-10)


@pytest.mark.parametrize("p", [1, 2])
def test_norm_of_float32_features_without_scaling_matches_reference_at_the_extremes(p):
    """norm(1), norm(2) of float32 features sum |h| or h^2 in float64 directly (no max-scaling): equal to the
    float64 reference, with the largest and the smallest float32 magnitudes and a row of zeros."""
    h, z = _features()
    h32 = np.concatenate([h.astype(np.float32), np.array([[3.4e38, -3.4e38] + [0.0] * (h.shape[1] - 2),
                                                          [1e-45, 1e-38] + [0.0] * (h.shape[1] - 2),
                                                          [0.0] * h.shape[1]], dtype=np.float32)])
    z = np.concatenate([z, np.zeros((3, z.shape[1]))])
    got = uvood.score_features(f"norm({p})", torch.tensor(h32), torch.tensor(z)).numpy()
    ref = _np_norm(h32.astype(np.float64), p)
    assert np.isfinite(got).all() and got[-1] == 0.0 and got[-2] > 0
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=0)


def test_norm_is_safe_for_large_p_small_p_and_zero_rows():
    h = torch.tensor([[1e200, 1e200, 0.0], [0.0, 0.0, 0.0], [3.0, 4.0, 0.0]], dtype=torch.float64)
    z = torch.zeros(3, 2)
    big = uvood.score_features("norm(50)", h, z)
    assert torch.isfinite(big).all()
    assert big[0].item() == pytest.approx(1e200 * 2 ** (1 / 50), rel=1e-12)
    assert big[1].item() == 0.0
    small = uvood.score_features("norm(0.1)", h, z)
    assert small[1].item() == 0.0 and small[2].item() == pytest.approx((3 ** 0.1 + 4 ** 0.1) ** 10, rel=1e-12)
    assert uvood.score_features("norm(0)", h, z).tolist() == [2.0, 0.0, 2.0]
    assert uvood.score_features("norm(inf)", h, z)[2].item() == 4.0


def test_products_are_elementwise_products():
    """U * V against the numpy references of both factors (not against uvood's own factors)."""
    h, z = _features()
    for p, v in [(0.3, "energy"), (math.inf, "tv"), (1, "msp"), (0, "varsum")]:
        prod = uvood.score_features(f"norm({_fmt(p)})*{v}", torch.tensor(h), torch.tensor(z))
        np.testing.assert_allclose(prod.numpy(), _np_norm(h, p) * REFERENCE[v](h, z), rtol=1e-12)


def _fmt(p):
    return "inf" if math.isinf(p) else str(p)


def test_gradnorm_is_norm1_times_tv():
    """Eq. 4: S_GN = (1/T) ||h||_1 sum_k |1/C - p^(k)| = (2/T) U V with U = ||h||_1 and V = TV, in numpy."""
    h, z = _features()
    for T in (1.0, 0.7):
        tv = 0.5 * np.abs(_np_softmax(z, T) - 1 / z.shape[1]).sum(1)
        got = uvood.score_features(f"gradnorm(T={T})", torch.tensor(h), torch.tensor(z)).numpy()
        np.testing.assert_allclose(got, 2 / T * np.abs(h).sum(1) * tv, rtol=1e-12)


@pytest.mark.parametrize("T", [1.0, 0.7, 2.0])
@pytest.mark.parametrize("c", [3, 10])
def test_closed_forms_equal_autograd_on_last_layer(T, c):
    """Eq. 4 and Eq. 5 (Appendix B) against autograd on a bias-free last layer W, in float64."""
    g = torch.Generator().manual_seed(c)
    n, d = 6, 9
    h = torch.relu(torch.randn(n, d, generator=g, dtype=torch.float64))
    W0 = torch.randn(c, d, generator=g, dtype=torch.float64)
    gn, eg = [], []
    for i in range(n):
        W = W0.clone().requires_grad_(True)
        logp = torch.log_softmax(W @ h[i] / T, dim=0)
        kl = -(logp.mean())  # KL(u || p) up to a constant
        (grad,) = torch.autograd.grad(kl, W, retain_graph=True)
        gn.append(grad.abs().sum())
        p = logp.exp().detach()
        total = 0.0
        for k in range(c):
            (gk,) = torch.autograd.grad(logp[k], W, retain_graph=True)
            total = total + p[k] * gk.abs().sum()
        eg.append(total)
    logits = h @ W0.T
    torch.testing.assert_close(uvood.score_features(f"gradnorm(T={T})", h, logits), torch.stack(gn))
    torch.testing.assert_close(uvood.score_features(f"exgrad(T={T})", h, logits), -torch.stack(eg))


def test_every_registered_feature_score_runs_finite():
    h, z = _features()
    h, z = torch.tensor(h), torch.tensor(z)
    for name in entries():
        spec = name if name != "norm" else "norm(2)"
        s = get_score(spec)
        if s.needs_model or s.needs_fit:
            continue
        out = uvood.score_features(s, h, z)
        assert out.shape == (64,) and out.dtype == torch.float64 and torch.isfinite(out).all(), name


def test_unknown_name_lists_closest():
    with pytest.raises(UvoodError, match="energy"):
        uvood.score_features("enrgy", torch.ones(2, 3), torch.zeros(2, 4))
    assert "msp" in uvood.list_scores() and "norm" in uvood.list_scores()


@pytest.mark.parametrize("spec,canon", [("energy(T=1)", "energy"), ("norm(0.30)*energy", "norm(0.3)*energy"),
                                        ("norm(inf) * tv", "norm(inf)*tv"), ("energy(t=2)", "energy(T=2)")])
def test_canonical_spec(spec, canon):
    assert uvood.canonical_spec(spec) == canon


@pytest.mark.parametrize("bad,message", [
    ("", "non-empty string"), ("norm", "needs its parameter 'p', e.g. norm"), ("norm(1,2)", "takes 1 positional"),
    ("msp(x=1)", "no parameter 'x'. Valid parameters: T"), ("msp*", "expected a score name"),
    ("energy(T=0)", "T must be > 0 and finite"), ("norm(-1)", r"needs p >= 0"), ("a b", "Unknown score 'a'")])
def test_bad_specs_raise_clear_errors(bad, message):
    with pytest.raises(UvoodError, match=message):
        uvood.get_score(bad)


def test_bad_features_raise():
    z = torch.randn(4, 3)
    with pytest.raises(UvoodError, match="NaN"):
        uvood.score_features("msp", torch.ones(4, 2), torch.tensor([[float("nan"), 0, 0]] * 4))
    with pytest.raises(UvoodError, match="infinite"):
        uvood.score_features("norm(1)", torch.tensor([[float("inf"), 0]] * 4), z)
    with pytest.raises(UvoodError, match="rows"):
        uvood.score_features("msp", torch.ones(3, 2), z)
    with pytest.raises(UvoodError, match="empty"):
        uvood.score_features("msp", torch.ones(0, 2), torch.ones(0, 3))
    with pytest.raises(UvoodError, match="2-D"):
        uvood.score_features("msp", torch.ones(4, 2), torch.ones(4))


@pytest.mark.parametrize("bad,msg", [
    ("energy(T=true)", r"T='true' is not valid; T must be a number, e.g. energy\(T=1\)"),
    ("energy(T=abc)", r"T='abc' is not valid; T must be a number"),
    ("norm(false)", r"p='false' is not valid; p must be a number"),
    ("gradnorm(bias=1)", r"bias='1' is not valid; bias must be true or false"),
    ("msp(" + "x" * 100_000 + "=1)", r"has no parameter 'xxxx*\.\.\. \(100002 characters\)"),
    ("n" * 100_000, r"Unknown score 'nnnn*\.\.\. \(100002 characters\)"),
    ("energy(T=1" + ")" * 100_000, r"Cannot parse score spec 'energy\(T=1\)\)\).*\.\.\. \(100012 characters\)"),
])
def test_spec_values_are_typed_and_long_specs_clipped_in_errors(bad, msg):
    with pytest.raises(UvoodError, match=msg) as err:
        uvood.get_score(bad)
    assert len(str(err.value)) < 400


def test_huge_integer_parameter_is_a_number_not_an_overflow():
    assert uvood.get_score("norm(" + "9" * 5000 + ")").spec == "norm(inf)"
    with pytest.raises(UvoodError, match="Temperature T must be > 0 and finite, got inf"):
        uvood.get_score("energy(T=" + "9" * 5000 + ")")
    for name in ("msp", "energy", "tv", "varsum", "entropy"):
        with pytest.raises(UvoodError, match="Temperature T must be > 0 and finite"):
            uvood.get_score(f"{name}(T=inf)")


def test_norm_times_energy_flips_per_sample_where_energy_is_negative():
    """The caveat stated in the registry: norm(p)*energy reads a larger ||h|| as more ID only where Energy >= 0;
    where every logit is below -log C (Energy < 0) it reads it as more OOD. Products with MSP never flip."""
    h = torch.tensor([[1.0, 2.0], [2.0, 4.0]], dtype=torch.float64)  # same direction, twice the norm
    for logits, energy_sign in (([4.0, 0.0, -1.0], 1), ([-9.0, -8.0, -7.0], -1)):
        z = torch.tensor([logits, logits], dtype=torch.float64)
        energy = torch.logsumexp(z, dim=1)
        assert torch.sign(energy[0]) == energy_sign
        small, big = uvood.score_features("norm(1)*energy", h, z)
        assert (big > small) if energy_sign > 0 else (big < small)
        small, big = uvood.score_features("norm(1)*msp", h, z)
        assert big > small
    assert "flips" in get_score("norm(1)*energy").__class__.__doc__
    assert "flips its orientation" in entries()["energy"].doc


def test_a_change_to_one_configuration_bumps_only_its_version():
    """The deep predicted-label norm-of-mean row became its closed form 0: its cache entries are
    recomputed, every other configuration of `grad` keeps version 1 (and its caches)."""
    from uvood.scores.registry import get_score

    zero = "grad(label=predicted,agg=norm_of_mean,norm=l2sq,depth=deep)"
    assert get_score(zero).version_tag == "grad:2"
    assert get_score("norm(1)*" + zero).version_tag == "norm:1*grad:2"
    for other in ("grad(label=predicted,agg=norm_of_mean,norm=l2sq)", "grad(label=uniform,agg=mean_of_norm,depth=deep)",
                  "grad(label=predicted,agg=mean_of_norm,norm=l2sq,weight=logp_over_p,depth=deep)"):
        assert get_score(other).version_tag == "grad:1"
