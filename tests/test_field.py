"""The field's detectors (issue 9) without a peer, and their bad input: brute-force references written
from the papers' formulas (float64 loops, scikit-learn), the "shape, then score" chain, fitted state
round trips, and the errors for inputs a fit or a score cannot use."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from sklearn.covariance import EmpiricalCovariance
from sklearn.decomposition import PCA
from sklearn.preprocessing import StandardScaler

import uvood
from uvood.errors import UvoodError
from uvood.scores import get_score, neighbours
from uvood.scores.fitted import fit_on_features, vim_dim
from uvood.scores.neighbours import kth_similarity
from uvood.scores.shaping import compose

D, C, N = 24, 5, 400


def _features(n=N, d=D, c=C, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(c, d, generator=g, dtype=torch.float64) / d**0.5
    b = torch.randn(c, generator=g, dtype=torch.float64) * 0.1
    h = torch.relu(torch.randn(n, d, generator=g, dtype=torch.float64) + 0.3)
    y = torch.arange(n) % c
    h = h + 0.5 * torch.nn.functional.one_hot(y, d)[:, :d].double() * (torch.arange(d) < c).double()
    return h, h @ w.T + b, y, w, b


@pytest.fixture(scope="module")
def feats():
    h, z, y, w, b = _features()
    ht, zt, _, _, _ = _features(n=60, seed=1)
    return dict(h=h, z=z, y=y, w=w, b=b, ht=ht, zt=ht @ w.T + b)


def fitted(spec, f):
    s = compose(spec) if ">" in spec else get_score(spec)
    return s.fit_features(f["h"], f["z"], f["y"], weight=f["w"], bias=f["b"])


# ---------------------------------------------------------------- references from the papers' formulas


@pytest.mark.parametrize("normalize", [False, True])
def test_mahalanobis_matches_sklearn_reference(feats, normalize):
    """Lee et al.'s code: class means, sklearn EmpiricalCovariance of the class-centred features,
    score max_k -(h - mu_k)^T P (h - mu_k); Mahalanobis++ first divides every h by ||h||_2."""
    prep = (lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)) if normalize else (lambda a: a)
    h, y, ht = prep(feats["h"].numpy()), feats["y"].numpy(), prep(feats["ht"].numpy())
    mu = np.stack([h[y == k].mean(0) for k in range(C)])
    prec = EmpiricalCovariance().fit(h - mu[y]).precision_
    ref = [max(-float((r - mu[k]) @ prec @ (r - mu[k])) for k in range(C)) for r in ht]
    u = fitted(f"mahalanobis(normalize={str(normalize).lower()})", feats).from_features(feats["ht"], feats["zt"])
    np.testing.assert_allclose(u.numpy(), ref, rtol=1e-9)


def test_neco_matches_sklearn_reference(feats):
    """NECO's code: StandardScaler, PCA, ||first d PCA coordinates|| / ||standardised h||."""
    ss = StandardScaler().fit(feats["h"].numpy())
    pca = PCA(D).fit(ss.transform(feats["h"].numpy()))
    s = ss.transform(feats["ht"].numpy())
    coords = pca.transform(s)[:, :7]
    ref = np.linalg.norm(coords, axis=1) / np.linalg.norm(s, axis=1)
    u = fitted("neco(d=7)", feats).from_features(feats["ht"], feats["zt"])
    np.testing.assert_allclose(u.numpy(), ref, rtol=1e-9)
    u2 = fitted("neco(d=7,maxlogit=true)", feats).from_features(feats["ht"], feats["zt"])
    np.testing.assert_allclose(u2.numpy(), ref * feats["zt"].amax(1).numpy(), rtol=1e-9)


def test_gen_matches_paper_formula_without_clamp():
    z = torch.tensor([[9.0, -8.0, 0.5, -30.0], [0.1, 0.2, 0.0, -0.1]], dtype=torch.float64)
    for gamma, M in ((0.1, 100), (0.5, 2)):
        ref = []
        for row in z.tolist():
            e = [np.exp(v - max(row)) for v in row]
            p = sorted((v / sum(e) for v in e), reverse=True)[:M]
            ref.append(-sum(q**gamma * (1 - q) ** gamma for q in p))
        u = get_score(f"gen(gamma={gamma},M={M})").from_features(torch.zeros(2, 3), z)
        np.testing.assert_allclose(u.numpy(), ref, rtol=1e-12)


def test_fdbd_and_knn_match_loops(feats):
    w, mu = feats["w"], feats["h"].mean(0)
    ref = []
    for h, z in zip(feats["ht"], feats["zt"]):
        k = int(z.argmax())
        ref.append(sum(abs(float(z[k] - z[c])) / float((w[k] - w[c]).norm()) for c in range(C) if c != k)
                   / ((C - 1) * float((h - mu).norm())))
    np.testing.assert_allclose(fitted("fdbd", feats).from_features(feats["ht"], feats["zt"]).numpy(), ref, rtol=1e-10)
    bank = feats["h"] / feats["h"].norm(dim=1, keepdim=True)
    q = feats["ht"] / feats["ht"].norm(dim=1, keepdim=True)
    ref = [-float(sorted((r - bank).norm(dim=1).tolist())[4]) for r in q]
    np.testing.assert_allclose(fitted("knn(5)", feats).from_features(feats["ht"], feats["zt"]).numpy(), ref, rtol=1e-9)


@pytest.mark.parametrize("backend", ["brute", "faiss", "pruned", "auto"])
@pytest.mark.parametrize("spread,copies", [(1.0, 1), (1.0, 4), (1e-9, 1)])
def test_knn_kth_similarity_equals_float64_brute_force(spread, copies, backend):
    """Float32 candidates (brute force, faiss or the pruned search) + float64 values equal the float64 k-th
    similarity, also when neighbours are near-ties that float32 cannot order: ``copies`` near-duplicates of each
    reference (ties inside the band), or a spread of 1e-9 (every query needs the exact fallback)."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(1, 32, generator=g, dtype=torch.float64)
    bank = base + spread * torch.randn(500 // copies, 32, generator=g, dtype=torch.float64)
    bank = bank.repeat(copies, 1) + 1e-10 * torch.randn(bank.shape[0] * copies, 32, generator=g, dtype=torch.float64)
    bank = bank / bank.norm(dim=1, keepdim=True)
    q = base + torch.randn(70, 32, generator=g, dtype=torch.float64) * 0.5
    q = q / q.norm(dim=1, keepdim=True)
    for k in (1, 10, 300):
        ref = torch.topk(q @ bank.T, k, dim=1).values[:, -1]
        torch.testing.assert_close(kth_similarity(q, bank, k, backend=backend), ref, rtol=1e-13, atol=1e-15)


def test_knn_blocks_and_backends_agree(monkeypatch):
    """Many float32 blocks (a tiny KNN_BLOCK) and certificate blocks, every backend: the KNN score is the
    float64 brute force -sqrt(2 - 2 s_(k)) for every query, on clustered features where ranks are close."""
    g = torch.Generator().manual_seed(5)
    centres = torch.randn(6, 48, generator=g, dtype=torch.float64)
    h = torch.relu(centres[torch.arange(3000) % 6] + 0.3 * torch.randn(3000, 48, generator=g, dtype=torch.float64))
    ht = torch.relu(centres[torch.arange(700) % 6] + 0.5 * torch.randn(700, 48, generator=g, dtype=torch.float64))
    monkeypatch.setattr(neighbours, "KNN_BLOCK", 3000 * 37)
    monkeypatch.setattr(neighbours, "CERTIFY_ROWS", 129)
    bank, q = h / h.norm(dim=1, keepdim=True), ht / ht.norm(dim=1, keepdim=True)
    ref = -(2 - 2 * torch.topk(q @ bank.T, 20, dim=1).values[:, -1]).clamp_min(0).sqrt()
    for backend in ("brute", "faiss", "pruned"):
        s = get_score("knn(20)").fit_features(h, torch.zeros(3000, 6))
        s.backend = backend
        out = s.from_features(ht, torch.zeros(700, 6))
        assert s._search.backend == backend
        torch.testing.assert_close(out, ref, rtol=1e-13, atol=1e-15)


def test_knn_backend_errors(monkeypatch):
    bank = torch.eye(40, 8, dtype=torch.float64)[torch.arange(40) % 8]
    q = torch.full((2, 8), float("nan"), dtype=torch.float64)
    for backend in neighbours.BACKENDS:
        with pytest.raises(UvoodError, match="the query features hold non-finite values"):
            kth_similarity(q, bank, 3, backend=backend)
    with pytest.raises(UvoodError, match="the reference features hold non-finite values"):
        kth_similarity(bank[:2], bank.clone().fill_(float("nan")), 3, backend="pruned")
    with pytest.raises(UvoodError, match="backend 'annoy' is unknown"):
        neighbours.resolve_backend("annoy")
    assert neighbours.resolve_backend("torch") == "brute"  # the older name of the built-in brute force
    monkeypatch.setattr(neighbours, "faiss_available", lambda: False)
    assert neighbours.resolve_backend("auto") == "pruned"
    with pytest.raises(UvoodError, match=r"needs faiss-cpu: pip install 'uvood\[faiss\]'"):
        neighbours.resolve_backend("faiss")


def test_odin_batched_equals_per_sample_backward_loop():
    """The batched perturbation equals one loss.backward() per sample on a float64 copy."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    x = torch.rand(9, 1, 3, 4)
    T, eps = 10.0, 0.01
    m64 = copy.deepcopy(model).double()
    ref = []
    for xi in x.double():
        xi = xi[None].clone().requires_grad_(True)
        z = m64(xi)
        loss = -torch.log_softmax(z / T, dim=1)[0, int(z.argmax())]
        loss.backward()
        xt = xi.detach() - eps * xi.grad.sign()
        with torch.no_grad():
            ref.append(float(torch.softmax(m64(xt) / T, dim=1).max()))
    u = get_score(f"odin(T={T},eps={eps})").from_model(model, x)
    np.testing.assert_allclose(u.numpy(), ref, rtol=1e-6)


def test_vim_default_dimension_rule():
    assert [vim_dim(d) for d in (2048, 1280, 768, 256)] == [1000, 512, 512, 128]


# ---------------------------------------------------------------- the chain "shape, then score"


def test_shaping_then_product_sees_the_shaped_features(feats):
    s = fitted("react(80)>norm(1)*energy", feats)
    c = float(np.percentile(feats["h"].numpy().ravel(), 80))
    hc = feats["ht"].clamp(max=c)
    ref = hc.abs().sum(1) * torch.logsumexp(hc @ feats["w"].T + feats["b"], dim=1)
    torch.testing.assert_close(s.from_features(feats["ht"], feats["zt"]), ref, rtol=1e-12, atol=0)
    assert s.spec == "react(80)>norm(1)*energy"
    assert compose("react(90)>energy").spec == "react(90)" == get_score("react(90)").spec


def test_fitted_factor_after_shaping_is_fitted_on_shaped_features(feats):
    s = fitted("scale(70)>norm(2)*mahalanobis", feats)
    ref = get_score("scale(70)").fit_features(feats["h"], feats["z"], weight=feats["w"], bias=feats["b"])
    h_fit, z_fit = ref.shaped(feats["h"])
    maha = get_score("mahalanobis").fit_features(h_fit, z_fit, feats["y"])
    ht, zt = ref.shaped(feats["ht"])
    torch.testing.assert_close(s.from_features(feats["ht"], feats["zt"]), ht.norm(dim=1) * maha.from_features(ht, zt),
                               rtol=1e-10, atol=0)


def test_fit_on_features_fits_every_fitted_factor_of_a_product(feats):
    s = fit_on_features(get_score("knn(5)*norm(1)*fdbd"), feats["h"], feats["z"], feats["y"], feats["w"], feats["b"])
    knn, fdbd = fitted("knn(5)", feats), fitted("fdbd", feats)
    ht, zt = feats["ht"], feats["zt"]
    torch.testing.assert_close(s.from_features(ht, zt), knn.from_features(ht, zt) * ht.abs().sum(1)
                               * fdbd.from_features(ht, zt), rtol=1e-12, atol=0)
    with pytest.raises(UvoodError, match="fitted on the model and its inputs"):
        fit_on_features(get_score("batchgrad*knn(5)"), feats["h"], feats["z"], feats["y"])


def test_chained_shapers_fit_on_shaped_features(feats):
    """react > dice: DICE's mean activation is taken on the clipped h; ASH then SCALE compose."""
    s = fitted("react(80)>dice(50)>msp", feats)
    c = float(np.percentile(feats["h"].numpy().ravel(), 80))
    hc = feats["h"].clamp(max=c)
    contrib = hc.mean(0)[None] * feats["w"]
    wm = feats["w"] * (contrib > torch.quantile(contrib.reshape(-1), 0.5))
    zt = feats["ht"].clamp(max=c) @ wm.T + feats["b"]
    torch.testing.assert_close(s.from_features(feats["ht"], feats["zt"]), torch.softmax(zt, 1).amax(1),
                               rtol=1e-12, atol=0)


def test_ash_variants_match_definitions(feats):
    h = feats["ht"]
    k = D - round(D * 0.75)
    top = torch.topk(h, k, dim=1)
    for variant in ("p", "b", "s"):
        hs = torch.zeros_like(h)
        for i in range(len(h)):
            for v, j in zip(top.values[i].tolist(), top.indices[i].tolist()):
                s1, s2 = float(h[i].sum()), float(top.values[i].sum())
                hs[i, j] = {"p": v, "b": s1 / k, "s": v * np.exp(s1 / s2)}[variant]
        ref = torch.logsumexp(hs @ feats["w"].T + feats["b"], dim=1)
        u = fitted(f"ash_{variant}(75)", feats).from_features(h, feats["zt"])
        torch.testing.assert_close(u, ref, rtol=1e-12, atol=0)


@pytest.mark.parametrize("spec", ["ash_s(75)", "scale(75)"])
def test_sharpening_of_an_all_zero_encoding_is_finite(feats, spec):
    """h = 0 (every ReLU unit off, e.g. far-OOD inputs): s1 = s2 = 0, the papers' exp(0/0) is undefined;
    h' = 0 and the score is Energy(b), finite, and the other rows are unchanged."""
    h = feats["ht"].clone()
    h[3] = 0.0
    u = fitted(spec, feats).from_features(h, h @ feats["w"].T + feats["b"])
    torch.testing.assert_close(u[3], torch.logsumexp(feats["b"], 0), rtol=1e-12, atol=0)
    keep = torch.arange(len(h)) != 3
    ref = fitted(spec, feats).from_features(feats["ht"][keep], feats["zt"][keep])
    torch.testing.assert_close(u[keep], ref, rtol=0, atol=0)


# ---------------------------------------------------------------- fitted state, Detector


@pytest.mark.parametrize("spec", ["mahalanobis", "mahalanobis(normalize=true)", "rmds", "knn(5)", "vim(d=8)",
                                  "neco(d=5)", "fdbd", "react(90)", "ash_s", "scale", "dice(70)",
                                  "react(80)>dice(50)>mahalanobis", "ash_p(50)>norm(1)*knn(3)"])
def test_state_round_trip(feats, spec):
    s = fitted(spec, feats)
    fresh = compose(spec) if ">" in spec else get_score(spec)
    fresh.load_state({k: v.clone() for k, v in s.state().items()})
    torch.testing.assert_close(fresh.from_features(feats["ht"], feats["zt"]), s.from_features(feats["ht"], feats["zt"]),
                               rtol=0, atol=0)


def test_detector_fits_saves_and_loads(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 40), torch.nn.ReLU(), torch.nn.Linear(40, 3))
    x, y = torch.rand(200, 1, 4, 4), torch.arange(200) % 3
    for spec in ("mahalanobis", "knn(10)", "react(90)", "odin(T=10)", "gen"):
        det = uvood.Detector(model, score=spec).fit((x, y))
        det.save(tmp_path / "d.pt")
        back = uvood.Detector.load(tmp_path / "d.pt", model)
        torch.testing.assert_close(back.score(x[:20]), det.score(x[:20]), rtol=0, atol=0)


# ---------------------------------------------------------------- bad input


def test_unfitted_score_says_so(feats):
    with pytest.raises(UvoodError, match="must be fitted on ID training data"):
        get_score("mahalanobis").from_features(feats["ht"], feats["zt"])


def test_one_class_is_refused(feats):
    with pytest.raises(UvoodError, match=r"no samples of class\(es\) \[1, 2, 3, 4\]"):
        get_score("mahalanobis").fit_features(feats["h"], feats["z"], torch.zeros(N, dtype=torch.long))


def test_fewer_samples_than_dimensions_is_refused(feats):
    with pytest.raises(UvoodError, match="covariance is singular"):
        get_score("rmds").fit_features(feats["h"][:20], feats["z"][:20], feats["y"][:20])


def test_class_conditional_needs_labels(feats):
    with pytest.raises(UvoodError, match="needs the ID training labels"):
        get_score("mahalanobis").fit_features(feats["h"], feats["z"], None)


@pytest.mark.parametrize("width,classes", [(D - 1, C), (D, C + 1)])
def test_other_feature_width_or_class_count_is_refused(feats, width, classes):
    s = fitted("vim(d=8)", feats)
    with pytest.raises(UvoodError, match=f"fitted on features of width D = {D} with C = {C} classes"):
        s.from_features(torch.rand(3, width, dtype=torch.float64), torch.rand(3, classes, dtype=torch.float64))


@pytest.mark.parametrize("spec", ["react(0)", "react(100)", "ash_b(150)", "scale(-5)", "dice(100)"])
def test_percentile_outside_open_interval_is_refused(spec):
    with pytest.raises(UvoodError, match="strictly between 0 and 100"):
        get_score(spec)


@pytest.mark.parametrize("spec,match", [("msp>energy", "is not a shaping term"),
                                        ("react(90)>grad(depth=deep)", "cannot follow a shaping term"),
                                        ("react(90)>>msp", "empty term"),
                                        ("knn(k=0)", "integer k >= 1"), ("vim(d=24)", "must be smaller")])
def test_bad_specs(feats, spec, match):
    with pytest.raises(UvoodError, match=match):
        fitted(spec, feats)


def test_load_state_with_missing_tensors_is_refused(feats):
    state = fitted("rmds", feats).state()
    del state["mu0"]
    with pytest.raises(UvoodError, match="needs the fitted tensors"):
        get_score("rmds").load_state(state)
