"""Parity with pytorch-ood 0.4.0: uvood's per-sample scores equal the peer's, after the documented
sign and constant, on the zoo model mnist-mlp and real data (fit: MNIST train, score: MNIST test +
Fashion-MNIST test).

pytorch-ood returns outlier scores (higher = more OOD); uvood the negatives, times the constant the
score's docstring names. The peer is imported without torchvision (tests/peers). Where the peer
computes in the input's dtype, it gets float64 features, so that the comparison checks formulas
and conventions, not float32 round-off; where it casts to float32 itself (ViM, DICE, fDBD, KNN's
normalisation, ODIN's model), it gets the float32 features the model produced.

Tolerance: every sample's relative error |u - c p| / |u| <= 1e-5; for ViM, whose score is a
difference of two terms that nearly cancel on some inputs, the error is taken relative to the
terms' magnitude |Energy| + alpha ||residual||.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from peers import pytorch_ood_detectors
from uvood import zoo
from uvood.data import load, to_model_format
from uvood.model import forward_features
from uvood.scores import get_score
from uvood.scores.fitted import head_weights
from uvood.scores.output import energy
from uvood.scores.shaping import compose

RTOL = 1e-5
N_FIT, N_TEST = 3000, 400


@pytest.fixture(scope="module")
def peer():
    return pytorch_ood_detectors()


@pytest.fixture(scope="module")
def field(data_dir):
    """mnist-mlp, ID fit features (MNIST train) and test features (MNIST + Fashion-MNIST test)."""
    model = zoo.load("mnist-mlp")
    train = load("mnist", "train", data_dir=data_dir, limit=N_FIT)
    tests = [load(name, "test", data_dir=data_dir, limit=N_TEST) for name in ("mnist", "fashionmnist")]
    x_fit = to_model_format(train.x, 1, 28)
    x = torch.cat([to_model_format(t.x, 1, 28) for t in tests])
    with torch.no_grad():
        h_fit, z_fit = forward_features(model, x_fit)
        h, z = forward_features(model, x)
    w, b = head_weights(model, x[:1])
    return dict(model=model, x=x, h_fit=h_fit, z_fit=z_fit, y_fit=torch.as_tensor(train.y).long(), h=h, z=z, w=w, b=b)


def assert_parity(u: torch.Tensor, expected: torch.Tensor, scale: torch.Tensor | None = None):
    u, expected = u.double(), expected.double()
    assert u.shape == expected.shape
    scale = u.abs() if scale is None else scale
    err = ((u - expected).abs() / scale).max().item()
    assert err <= RTOL, f"max relative error {err:.3g} > {RTOL}"


def fitted(spec: str, f) -> torch.nn.Module:
    s = compose(spec) if ">" in spec else get_score(spec)
    s.fit_features(f["h_fit"], f["z_fit"], f["y_fit"], weight=f["w"], bias=f["b"])
    return s


def _head(f):
    w, b = f["w"], f["b"]
    return lambda t: t.reshape(t.shape[0], -1).double() @ w.T + b


# ---------------------------------------------------------------- output scores


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_output_scores_equal_peer(peer, field, T):
    z = field["z"].double()
    h = field["h"]
    assert_parity(get_score(f"msp(T={T})").from_features(h, z), -peer.MaxSoftmax.score(z, t=T))
    assert_parity(get_score(f"energy(T={T})").from_features(h, z), -peer.EnergyBased.score(z, t=T))
    assert_parity(get_score("maxlogit").from_features(h, z), -peer.MaxLogit.score(z))


def test_entropy_equals_peer_where_its_clip_does_not_bind(peer, field):
    """pytorch-ood clips p to [1e-7, 1] before the entropy; uvood does not. Where min p >= 1e-7 the
    two agree; where it is below, uvood equals the unclipped sum_k p log p (brute force)."""
    z = field["z"].double()
    u = get_score("entropy").from_features(field["h"], z)
    p = torch.softmax(z, dim=1)
    free = p.amin(1) >= 1e-7
    assert 0 < int(free.sum()) < len(z)  # both regimes occur on this data
    assert_parity(u[free], -peer.Entropy.score(z)[free])
    brute = torch.tensor([sum(float(q) * float(torch.log(q)) for q in row if q > 0) for row in p[~free]],
                         dtype=torch.float64)
    assert_parity(u[~free], brute)


@pytest.mark.parametrize("gamma,M", [(0.1, None), (0.5, 5)])
def test_gen_equals_peer_with_its_clamp(peer, field, gamma, M):
    """pytorch-ood averages over the top M (or all C) clamped probabilities: gen(eps=1e-7) = -M * pood."""
    z = field["z"].double()
    m = z.shape[1] if M is None else M
    u = get_score(f"gen(gamma={gamma},M={m},eps=1e-7)").from_features(field["h"], z)
    assert_parity(u, -m * peer.GEN.score(z, gamma=gamma, M=M))


# ---------------------------------------------------------------- feature statistics


def test_mahalanobis_equals_peer(peer, field):
    """pytorch-ood: 0.5 min_k d_k with the undivided scatter (+1e-6 I): uvood = -2 n * pood."""
    torch.set_default_dtype(torch.float64)  # the peer allocates its means and covariance with the default dtype
    try:
        p = peer.Mahalanobis(None).fit_features(field["h_fit"].double(), field["y_fit"]).predict_features(
            field["h"].double())
    finally:
        torch.set_default_dtype(torch.float32)
    assert_parity(fitted("mahalanobis", field).from_features(field["h"], field["z"]), -2 * N_FIT * p)


def test_rmds_equals_peer(peer, field):
    """pytorch-ood RMD: min_k [d_k - d_0] with undivided scatters: uvood = -n * pood."""
    torch.set_default_dtype(torch.float64)
    try:
        p = peer.RMD(None).fit_features(field["h_fit"].double(), field["y_fit"]).predict_features(field["h"].double())
    finally:
        torch.set_default_dtype(torch.float32)
    assert_parity(fitted("rmds", field).from_features(field["h"], field["z"]), -N_FIT * p)


@pytest.mark.parametrize("k", [50, 7])
def test_knn_equals_peer(peer, field, k):
    p = peer.KNN(None, k=k).fit_features(field["h_fit"], field["y_fit"]).predict_features(field["h"])
    assert_parity(fitted(f"knn({k})", field).from_features(field["h"], field["z"]), -p)


@contextlib.contextmanager
def peer_in_float64():
    """Run the peer's own code in float64: default dtype float64 and ``Tensor.float`` a no-op (ViM
    casts everything to float32, and float32 ``eigh`` cannot resolve a small eigenvalue gap to 1e-5)."""
    cast = torch.Tensor.float
    torch.set_default_dtype(torch.float64)
    torch.Tensor.float = lambda self, *a, **k: self.double()
    try:
        yield
    finally:
        torch.Tensor.float = cast
        torch.set_default_dtype(torch.float32)


def test_vim_equals_peer(peer, field):
    """pytorch-ood ViM as installed (float32 inside): alpha ||R^T (h - u)|| - logsumexp(z), uvood = -pood."""
    det = peer.ViM(None, d=64, w=field["w"], b=field["b"]).fit_features(field["h_fit"], field["y_fit"])
    p = det.predict_features(field["h"])
    u = fitted("vim(d=64)", field).from_features(field["h"], field["z"])
    e = energy(field["z"])
    assert_parity(u, -p, scale=e.abs() + (u - e).abs())


@pytest.mark.parametrize("d", [64, 200])
def test_vim_equals_peer_in_float64(peer, field, d):
    """The peer's ViM code run in float64; both given the logits W h + b it computes from h."""
    with peer_in_float64():
        det = peer.ViM(None, d=d, w=field["w"], b=field["b"]).fit_features(field["h_fit"].double(), field["y_fit"])
        p = det.predict_features(field["h"].double())
    head = _head(field)
    s = get_score(f"vim(d={d})")
    s.fit_features(field["h_fit"], head(field["h_fit"]), field["y_fit"], weight=field["w"], bias=field["b"])
    assert_parity(s.from_features(field["h"], head(field["h"])), -p)


def test_fdbd_equals_peer(peer, field):
    head = torch.nn.Linear(field["w"].shape[1], field["w"].shape[0])
    head.weight.data, head.bias.data = field["w"].float(), field["b"].float()
    p = peer.fDBD(None, head).fit_features(field["h_fit"]).predict_features(field["h"])
    assert_parity(fitted("fdbd", field).from_features(field["h"], field["z"]), -p)


# ---------------------------------------------------------------- shaping, then a score


@pytest.mark.parametrize("p", [90, 65])
def test_react_equals_peer(peer, field, p):
    """uvood's percentile p is pytorch-ood's fraction p / 100, over every activation of the ID data."""
    det = peer.ReAct(None, _head(field), percentile=p / 100).fit_feature_maps(field["h_fit"], field["y_fit"])
    assert_parity(fitted(f"react({p})", field).from_features(field["h"], field["z"]),
                  -det.predict_feature_maps(field["h"].double()))


@pytest.mark.parametrize("then,peer_score", [("msp", "MaxSoftmax"), ("maxlogit", "MaxLogit")])
def test_react_then_output_score_equals_peer(peer, field, then, peer_score):
    det = peer.ReAct(None, _head(field), percentile=0.9, detector=getattr(peer, peer_score).score)
    det.fit_feature_maps(field["h_fit"], field["y_fit"])
    assert_parity(fitted(f"react(90)>{then}", field).from_features(field["h"], field["z"]),
                  -det.predict_feature_maps(field["h"].double()))


@pytest.mark.parametrize("variant,p", [("p", 60), ("b", 65), ("s", 90), ("s", 65)])
def test_ash_equals_peer(peer, field, variant, p):
    """On h (N x D), pytorch-ood's ASH of the B x D x 1 x 1 feature maps."""
    det = peer.ASH(None, _head(field), variant=f"ash-{variant}", percentile=p / 100)
    assert_parity(fitted(f"ash_{variant}({p})", field).from_features(field["h"], field["z"]),
                  -det.predict_feature_maps(field["h"].double()[:, :, None, None]))


@pytest.mark.parametrize("p", [85, 65])
def test_scale_equals_peer(peer, field, p):
    det = peer.SCALE(None, _head(field), percentile=p / 100)
    assert_parity(fitted(f"scale({p})", field).from_features(field["h"], field["z"]),
                  -det.predict_feature_maps(field["h"].double()[:, :, None, None]))


@pytest.mark.parametrize("p", [90, 70])
def test_dice_equals_peer(peer, field, p):
    """pytorch-ood DICE (float32 inside): sparsity fraction p / 100 of the contributions m_j W_cj."""
    det = peer.DICE(None, field["w"], field["b"], p=p / 100).fit_features(field["h_fit"], field["y_fit"])
    assert_parity(fitted(f"dice({p})", field).from_features(field["h"], field["z"]),
                  -det.predict_features(field["h"]))


# ---------------------------------------------------------------- input perturbation


@pytest.mark.parametrize("T,eps", [(1000.0, 0.0014), (10.0, 0.005)])
def test_odin_equals_peer(peer, field, T, eps):
    x = field["x"][::4]
    u = get_score(f"odin(T={T},eps={eps})").from_model(field["model"], x)
    assert_parity(u, -peer.ODIN(field["model"], eps=eps, temperature=T).predict(x))
