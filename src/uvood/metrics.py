"""OOD metrics on two score arrays, oriented "higher score = more in-distribution".

Every function takes ``(id_scores, ood_scores)``. Nothing is ever flipped: a score that ranks
OOD above ID gets an AUROC below 0.5 and it is reported as such.

- :func:`auroc` — Mann-Whitney U / (n_id n_ood): P(S_id > S_ood) + 1/2 P(S_id = S_ood).
- :func:`threshold_at_tpr` — the one threshold rule (also :class:`uvood.Detector`'s).
- :func:`fpr_at_tpr` — ``positive="id"`` (GradNorm paper, the seed code): the share of OOD
  accepted at the largest threshold that keeps ``tpr`` of ID; ``positive="ood"`` (OpenOOD
  v1.5): the share of ID rejected at the threshold that catches ``tpr`` of OOD.
- :func:`aupr_in`, :func:`aupr_out` — average precision with ID (resp. OOD) as positive,
  the step-wise sum of scikit-learn's ``average_precision_score``.
- :func:`detection_error` — min over thresholds of 1/2 (1 - TPR) + 1/2 FPR.
- :func:`bootstrap_ci` — seeded percentile bootstrap interval of any of them.

All are O(n log n) in numpy and match scikit-learn to 1e-9, ties included (tested).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .errors import UvoodError

#: bumped whenever a change alters a metric's value; enters the benchmark's metric memo key
METRICS_VERSION = 1

#: what the metrics compute, written to each benchmark run's ``run.json`` (FPR's positive class is the run's own)
CONVENTIONS = {
    "auroc": "Mann-Whitney U / (n_id n_ood), ties count 1/2",
    "aupr": "average precision (step-wise sum, as sklearn average_precision_score), not the trapezoidal area",
    "aupr_in": "ID positive", "aupr_out": "OOD positive (scores negated)",
    "ci": "seeded percentile bootstrap of the AUROC",
}


def _as_scores(x, name: str) -> np.ndarray:
    try:
        import torch

        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().double().numpy()
    except ImportError:  # pragma: no cover
        pass
    try:
        a = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError):
        raise UvoodError(f"{name} must be numbers, one score per sample (a 1-D array or tensor); got "
                         f"{type(x).__name__} that does not convert to floats.") from None
    if sum(d > 1 for d in a.shape) > 1:  # (N,), (N, 1) and (1, N) are one score per sample; (N, C) is not
        raise UvoodError(f"{name} must hold one score per sample (shape (N,)), got shape {a.shape}: score the "
                         "inputs first (e.g. uvood.score_features), rather than passing logits or features.")
    a = a.reshape(-1)
    if a.size == 0:
        raise UvoodError(f"{name} is empty: metrics need at least one ID and one OOD score "
                         "(only one class present).")
    if not np.isfinite(a).all():
        n_bad = int((~np.isfinite(a)).sum())
        raise UvoodError(f"{name} holds {n_bad} non-finite value(s) (NaN or inf). A metric of such scores is "
                         "undefined: find which inputs give them (e.g. non-finite logits) and drop or fix them.")
    return a


def _check(id_scores, ood_scores) -> tuple[np.ndarray, np.ndarray]:
    return _as_scores(id_scores, "id_scores"), _as_scores(ood_scores, "ood_scores")


def _counts(pos: np.ndarray, neg: np.ndarray):
    """Distinct thresholds t (descending) with cumulative counts #pos >= t and #neg >= t."""
    scores = np.concatenate([pos, neg])
    is_pos = np.concatenate([np.ones(pos.size, bool), np.zeros(neg.size, bool)])
    order = np.argsort(-scores, kind="mergesort")
    s, lab = scores[order], is_pos[order]
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]  # last index of each tie group
    tp = np.cumsum(lab)[last]
    fp = (last + 1) - tp
    return s[last], tp, fp


def auroc(id_scores, ood_scores) -> float:
    """Area under the ROC curve with ID as positive: P(S_id > S_ood) + 1/2 P(S_id = S_ood).

    The Mann-Whitney statistic, computed by sorting the ID scores once and locating every OOD
    score in them (two binary searches give the counts of ID scores above and equal to it).
    """
    pos, neg = _check(id_scores, ood_scores)
    pos, neg = np.sort(pos), np.sort(neg)  # sorted queries make the searches cache-friendly
    below_or_equal = np.searchsorted(pos, neg, side="right")
    below = np.searchsorted(pos, neg, side="left")
    above = pos.size - below_or_equal
    ties = below_or_equal - below
    return float((above.sum() + 0.5 * ties.sum()) / (pos.size * neg.size))


def _kth_largest_index(n: int, tpr: float) -> int:
    """Smallest k with k / n >= tpr (in float, as scikit-learn compares)."""
    k = max(1, min(n, int(np.ceil(tpr * n))))
    while k > 1 and (k - 1) / n >= tpr:
        k -= 1
    while k < n and k / n < tpr:
        k += 1
    return k


def check_tpr(tpr) -> float:
    if isinstance(tpr, bool) or not isinstance(tpr, (int, float, np.floating)) or not 0.0 < tpr <= 1.0:
        raise UvoodError(f"tpr must be a number in (0, 1], got {tpr!r}; e.g. tpr=0.95 keeps 95 % of ID.")
    return float(tpr)


def _threshold(pos: np.ndarray, tpr: float) -> float:
    k = _kth_largest_index(pos.size, tpr)
    return float(np.partition(pos, pos.size - k)[pos.size - k])


def threshold_at_tpr(id_scores, tpr: float = 0.95) -> float:
    """The ID-acceptance threshold at true-positive rate ``tpr`` (ID positive, S(x) >= t accepted):

        t = max { t : P(S_id >= t) >= tpr } = the k-th largest ID score, k = min { k : k / n >= tpr }

    (ties at t are all accepted, so at least ``tpr`` of ID is kept). The one threshold rule of
    uvood: :func:`fpr_at_tpr` reads the OOD rate at it and :class:`uvood.Detector` flags x as
    OOD when S(x) < t. O(n) with a partial sort.
    """
    return _threshold(_as_scores(id_scores, "id_scores"), check_tpr(tpr))


def fpr_at_tpr(id_scores, ood_scores, tpr: float = 0.95, positive: str = "id") -> float:
    """False-positive rate at the first ROC point whose true-positive rate reaches ``tpr``.

    ``positive="id"``: accept x as ID when S(x) >= t with t = :func:`threshold_at_tpr` of the ID
    scores; returns P(S_ood >= t) (the share of OOD accepted as ID).
    ``positive="ood"``: flag x as OOD when S(x) <= t; t is the smallest threshold with
    P(S_ood <= t) >= tpr; returns P(S_id <= t) (the share of ID rejected).
    Equals scikit-learn's ``roc_curve(drop_intermediate=False)`` read at the first index with
    tpr >= ``tpr``. O(n) with a partial sort.
    """
    tpr = check_tpr(tpr)
    pos, neg = _check(id_scores, ood_scores)
    if positive == "ood":
        pos, neg = -neg, -pos
    elif positive != "id":
        raise UvoodError(f"positive must be 'id' or 'ood', got {positive!r}.")
    t = _threshold(pos, tpr)
    return float(np.count_nonzero(neg >= t) / neg.size)


def fpr95(id_scores, ood_scores, positive: str = "id") -> float:
    """FPR at 95 % TPR (see :func:`fpr_at_tpr`)."""
    return fpr_at_tpr(id_scores, ood_scores, 0.95, positive)


def _average_precision(pos: np.ndarray, neg: np.ndarray) -> float:
    _, tp, fp = _counts(pos, neg)
    precision = tp / (tp + fp)
    recall = tp / pos.size
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def aupr_in(id_scores, ood_scores) -> float:
    """Average precision with ID as the positive class (scores as given)."""
    pos, neg = _check(id_scores, ood_scores)
    return _average_precision(pos, neg)


def aupr_out(id_scores, ood_scores) -> float:
    """Average precision with OOD as the positive class (scores negated)."""
    pos, neg = _check(id_scores, ood_scores)
    return _average_precision(-neg, -pos)


def detection_error(id_scores, ood_scores) -> float:
    """min_t 1/2 P(S_id < t) + 1/2 P(S_ood >= t), over all ROC points including "accept none"."""
    pos, neg = _check(id_scores, ood_scores)
    _, tp, fp = _counts(pos, neg)
    tpr = np.r_[0.0, tp / pos.size]
    fpr = np.r_[0.0, fp / neg.size]
    return float(np.min(0.5 * (1.0 - tpr) + 0.5 * fpr))


METRICS: dict[str, Callable[..., float]] = {
    "auroc": auroc,
    "fpr95": fpr95,
    "aupr_in": aupr_in,
    "aupr_out": aupr_out,
    "detection_error": detection_error,
}


def _resample_indices(rng: np.random.Generator, n_pos: int, n_neg: int, n_boot: int, block: int = 100):
    """Blocks of bootstrap index arrays (ID and OOD resampled separately, with replacement)."""
    for start in range(0, n_boot, block):
        b = min(block, n_boot - start)
        yield rng.integers(0, n_pos, (b, n_pos)), rng.integers(0, n_neg, (b, n_neg))


def _bootstrap_auroc(pos: np.ndarray, neg: np.ndarray, rng, n_boot: int) -> np.ndarray:
    """AUROC of every bootstrap resample at once, from resampling counts (no re-sorting).

    A resample's AUROC is sum_j v_j (W_above(t_j) + W_equal(t_j) / 2) / (n m), with w_i, v_j
    the multiplicities of ID score i and OOD score j in the resample and W the weight of the
    ID scores above / equal to OOD score t_j.
    """
    order = np.argsort(pos, kind="stable")
    sorted_pos = pos[order]
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    hi = np.searchsorted(sorted_pos, neg, side="right")
    lo = np.searchsorted(sorted_pos, neg, side="left")
    n, m = pos.size, neg.size
    out = []
    for ip, ineg in _resample_indices(rng, n, m, n_boot):
        b = ip.shape[0]
        rows = np.arange(b)[:, None]
        w = np.bincount((rank[ip] + rows * n).ravel(), minlength=b * n).reshape(b, n)  # in sorted order
        v = np.bincount((ineg + rows * m).ravel(), minlength=b * m).reshape(b, m)
        cw = np.zeros((b, n + 1))
        np.cumsum(w, axis=1, out=cw[:, 1:])
        c_hi = cw[:, hi]
        out.append((((n - c_hi) + 0.5 * (c_hi - cw[:, lo])) * v).sum(axis=1) / (n * m))
    return np.concatenate(out)


def _metric(metric) -> Callable[..., float]:
    if callable(metric):
        return metric
    if isinstance(metric, str) and metric in METRICS:
        return METRICS[metric]
    raise UvoodError(f"Unknown metric {metric!r}: give one of {', '.join(METRICS)} or a function "
                     "f(id_scores, ood_scores) -> float.")


def bootstrap_ci(metric: Callable[..., float] | str, id_scores, ood_scores, n_boot: int = 1000,
                 alpha: float = 0.05, seed: int = 0) -> tuple[float, float]:
    """Seeded percentile bootstrap (1 - alpha) interval of ``metric``: the alpha/2 and 1 - alpha/2
    quantiles of the metric over ``n_boot`` resamples (so lower <= upper for alpha in (0, 1)).

    ID and OOD scores are resampled separately, with replacement, ``n_boot`` times. AUROC uses
    a vectorised path over all resamples; it draws the same resamples as the generic path.
    """
    fn = _metric(metric)
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise UvoodError(f"n_boot must be an integer >= 1 (the number of bootstrap resamples), got {n_boot!r}; "
                         "1000 is usual.")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.floating)) or not 0.0 < alpha < 1.0:
        raise UvoodError(f"alpha must be in (0, 1) (the interval covers 1 - alpha), got {alpha!r}; "
                         "alpha=0.05 gives a 95 % interval.")
    pos, neg = _check(id_scores, ood_scores)
    rng = np.random.default_rng(seed)
    if fn is auroc:
        vals = _bootstrap_auroc(pos, neg, rng, int(n_boot))
    else:
        vals = np.concatenate([[fn(pos[a], neg[b]) for a, b in zip(ip, ineg)]
                               for ip, ineg in _resample_indices(rng, pos.size, neg.size, int(n_boot))])
    lo, hi = np.quantile(vals, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def evaluate(id_scores, ood_scores, ci: bool = False, n_boot: int = 1000, seed: int = 0) -> dict[str, float]:
    """All metrics in one dict (and the AUROC bootstrap interval when ``ci``)."""
    out = {name: fn(id_scores, ood_scores) for name, fn in METRICS.items()}
    if ci:
        out["ci_low"], out["ci_high"] = bootstrap_ci(auroc, id_scores, ood_scores, n_boot=n_boot, seed=seed)
    return out
