"""Metrics against scikit-learn (to 1e-9), on random and heavily tied scores."""

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from uvood import metrics as M
from uvood.errors import UvoodError


def _cases():
    g = np.random.default_rng(1)
    for i in range(120):
        n_id, n_ood = g.integers(1, 80, 2)
        if i % 3 == 0:  # heavy ties: a handful of distinct values
            a, b = g.integers(0, 4, n_id).astype(float), g.integers(0, 4, n_ood).astype(float)
        elif i % 3 == 1:
            a, b = g.normal(1, 1, n_id), g.normal(0, 1, n_ood)
        else:  # ties across and within classes, plus some constant blocks
            a = np.round(g.normal(0.5, 1, n_id), 1)
            b = np.r_[np.round(g.normal(0, 1, n_ood - 1), 1), a[0]]
        yield a, b


def _sk(a, b):
    y = np.r_[np.ones(a.size), np.zeros(b.size)]
    return y, np.r_[a, b]


@pytest.mark.parametrize("tpr", [0.95, 0.5, 0.8, 1.0])
def test_parity_with_sklearn(tpr):
    for a, b in _cases():
        y, s = _sk(a, b)
        assert abs(M.auroc(a, b) - roc_auc_score(y, s)) < 1e-9
        assert abs(M.aupr_in(a, b) - average_precision_score(y, s)) < 1e-9
        assert abs(M.aupr_out(a, b) - average_precision_score(1 - y, -s)) < 1e-9
        fpr, tp, _ = roc_curve(y, s, drop_intermediate=False)
        assert abs(M.fpr_at_tpr(a, b, tpr) - fpr[np.searchsorted(tp, tpr)]) < 1e-9
        assert abs(M.detection_error(a, b) - np.min(0.5 * (1 - tp) + 0.5 * fpr)) < 1e-9
        fpr_o, tp_o, _ = roc_curve(1 - y, -s, drop_intermediate=False)
        assert abs(M.fpr_at_tpr(a, b, tpr, positive="ood") - fpr_o[np.searchsorted(tp_o, tpr)]) < 1e-9


def test_known_values():
    assert M.auroc([1, 2, 3], [0, 0]) == 1.0
    assert M.auroc([1.0], [1.0]) == 0.5
    assert M.auroc([0, 1], [1, 2]) == pytest.approx(1 / 8)
    assert M.fpr95(np.arange(100), np.arange(100) - 0.5) == pytest.approx(0.94)  # t = 5; OOD 5.5..98.5


def test_anti_correlated_score_is_reported_below_half_never_flipped():
    g = np.random.default_rng(0)
    id_s, ood_s = g.normal(0, 1, 500), g.normal(2, 1, 500)
    assert M.auroc(id_s, ood_s) < 0.2
    assert M.fpr95(id_s, ood_s) > 0.9
    assert M.evaluate(id_s, ood_s)["auroc"] < 0.2


def test_bootstrap_is_seeded_and_brackets_estimate():
    g = np.random.default_rng(0)
    a, b = g.normal(1, 1, 300), g.normal(0, 1, 300)
    lo, hi = M.bootstrap_ci("auroc", a, b, n_boot=200, seed=3)
    assert (lo, hi) == M.bootstrap_ci(M.auroc, a, b, n_boot=200, seed=3)
    assert lo < M.auroc(a, b) < hi and hi - lo < 0.15


def test_vectorised_bootstrap_auroc_equals_per_resample_loop():
    g = np.random.default_rng(2)
    a, b = np.round(g.normal(0.5, 1, 257), 1), np.round(g.normal(0, 1, 131), 1)  # ties included
    fast = M.bootstrap_ci(M.auroc, a, b, n_boot=230, seed=5, alpha=0.2)
    slow = M.bootstrap_ci(lambda x, y: M.auroc(x, y), a, b, n_boot=230, seed=5, alpha=0.2)
    assert fast == pytest.approx(slow, abs=1e-12)


def _brute_threshold(a, tpr):
    """max t over the ID scores with (#ID >= t) / n >= tpr, by trying every candidate."""
    return max(t for t in a if np.count_nonzero(a >= t) / a.size >= tpr)


@pytest.mark.parametrize("tpr", [0.95, 0.5, 0.8, 1.0, 0.01, 0.9 + 5e-11, 0.7 - 1e-12, 1 / 3])
def test_threshold_at_tpr_is_the_brute_force_definition(tpr):
    for a, _ in _cases():
        t = M.threshold_at_tpr(a, tpr)
        assert t == _brute_threshold(a, tpr)
        assert np.count_nonzero(a >= t) / a.size >= tpr  # keeps at least tpr of ID


def test_bootstrap_refuses_bad_settings():
    a, b = np.arange(20.0), np.arange(20.0) - 3
    with pytest.raises(UvoodError, match=r"alpha must be in \(0, 1\)"):
        M.bootstrap_ci("auroc", a, b, alpha=2)
    with pytest.raises(UvoodError, match=r"alpha must be in \(0, 1\)"):
        M.bootstrap_ci("fpr95", a, b, alpha=0)
    with pytest.raises(UvoodError, match="n_boot must be an integer >= 1"):
        M.bootstrap_ci("auroc", a, b, n_boot=0)
    with pytest.raises(UvoodError, match="n_boot must be an integer >= 1"):
        M.bootstrap_ci("aupr_in", a, b, n_boot=2.5)
    with pytest.raises(UvoodError, match="Unknown metric 'aurc': give one of auroc, fpr95"):
        M.bootstrap_ci("aurc", a, b)
    lo, hi = M.bootstrap_ci("detection_error", a, b, n_boot=50, alpha=0.9)
    assert lo <= hi


def test_bad_inputs():
    with pytest.raises(UvoodError, match="non-finite"):
        M.auroc([1.0, np.nan], [0.0])
    with pytest.raises(UvoodError, match="non-finite"):
        M.fpr95([1.0], [np.inf])
    with pytest.raises(UvoodError, match="only one class"):
        M.auroc([], [1.0, 2.0])
    with pytest.raises(UvoodError, match="only one class"):
        M.aupr_in([1.0], [])
    with pytest.raises(UvoodError, match="positive"):
        M.fpr_at_tpr([1.0], [0.0], positive="both")
    with pytest.raises(UvoodError, match=r"tpr must be a number in \(0, 1\]"):
        M.threshold_at_tpr([1.0, 2.0], 1.5)
    with pytest.raises(UvoodError, match=r"tpr must be a number in \(0, 1\]"):
        M.fpr_at_tpr([1.0], [0.0], tpr="0.95")


def test_scores_must_be_one_per_sample():
    """A 2-D array (logits, features) used to be flattened into N x C "scores" and given a metric."""
    rng = np.random.default_rng(0)
    with pytest.raises(UvoodError, match=r"one score per sample \(shape \(N,\)\), got shape \(2, 5\)"):
        M.auroc(rng.random((2, 5)), rng.random(4))
    with pytest.raises(UvoodError, match="ood_scores must be numbers"):
        M.auroc([1.0, 2.0], ["a", "b"])
    a, b = rng.random(6), rng.random(5)  # a column or a row of scores is one score per sample
    assert M.auroc(a[:, None], b[None, :]) == M.auroc(a, b)
    assert M.auroc(a, b) == pytest.approx(roc_auc_score(np.r_[np.ones(6), np.zeros(5)], np.r_[a, b]), abs=1e-12)
