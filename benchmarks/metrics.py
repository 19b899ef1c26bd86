"""Time uvood's AUROC and FPR95 against scikit-learn on 1e6 scores, in the same run.

    python benchmarks/metrics.py [--n 1000000] [--repeats 5]

Prints the median seconds of each and the ratio sklearn / uvood (> 1: uvood is faster).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

from uvood import metrics


def sk_fpr95(y, s):
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    return fpr[np.searchsorted(tpr, 0.95)]


def timed(fn, repeats):
    times, value = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=1_000_000, help="total number of scores (half ID, half OOD)")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    g = np.random.default_rng(0)
    n = args.n // 2
    # rounded scores: realistic ties
    id_s, ood_s = np.round(g.normal(1, 1, n), 4), np.round(g.normal(0, 1, n), 4)
    y, s = np.r_[np.ones(n), np.zeros(n)], np.r_[id_s, ood_s]
    rows = [
        ("AUROC", lambda: metrics.auroc(id_s, ood_s), lambda: roc_auc_score(y, s)),
        ("FPR95", lambda: metrics.fpr95(id_s, ood_s), lambda: sk_fpr95(y, s)),
    ]
    print(f"{args.n:,} scores, median of {args.repeats} runs")
    print(f"{'metric':<8}{'uvood s':>10}{'sklearn s':>12}{'ratio':>9}  same value")
    for name, ours, theirs in rows:
        t_ours, v_ours = timed(ours, args.repeats)
        t_sk, v_sk = timed(theirs, args.repeats)
        print(f"{name:<8}{t_ours:>10.4f}{t_sk:>12.4f}{t_sk / t_ours:>8.1f}x  {abs(v_ours - v_sk) < 1e-9}")


if __name__ == "__main__":
    main()
