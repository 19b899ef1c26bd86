"""The named groups of scores each paper table or figure needs, as (label, spec) pairs.

A spec is a registry spec string (``uvood.scores.registry``), so the API, the CLI and the
tables share one set of names. ``depth`` of a gradient row is part of its spec
(``gradnorm(depth=deep)``); for the paper-value lookup it is split off again.
"""

from __future__ import annotations

import re  # noqa: F401

from ..scores.registry import canonical_spec

P_GRID = ("0", "0.1", "0.3", "0.5", "0.8", "1", "2", "3", "4", "5", "6", "inf")
V_GRID = ("energy", "tv", "msp", "varsum")

# The paper's shallow gradient rows use the authors' definition: the head's weight AND bias are differentiated
# (h~ = [h, 1], ``bias=true``). The weight-only variant (``bias=false``, W alone) is kept beside the main ones:
# it is 0 for an input with h = 0 (ReLU features), which the negated ExGrad ranks as the most ID possible
# (docs/gradient_scores.md, "Degenerate encodings"). Paper values are looked up for the bias=true rows only.
W_ONLY = " [W only]"

# Table 1 / Appendix A: (expression as in the paper, base spec, depth), in the paper's row order
TABLE1 = [
    ("||E_{Y~p}[grad log p(Y)]||_2^2", "grad(label=predicted,agg=norm_of_mean,norm=l2sq)", "deep"),
    ("||E_{Y~p}[grad log p(Y)]||_2^2", "grad(label=predicted,agg=norm_of_mean,norm=l2sq,bias=true)", "shallow"),
    ("E_{Y~U}[||grad log p(Y)||_1]", "grad(label=uniform,agg=mean_of_norm,norm=l1)", "deep"),
    ("E_{Y~U}[||grad log p(Y)||_1]", "grad(label=uniform,agg=mean_of_norm,norm=l1,bias=true)", "shallow"),
    ("E_{Y~U}[||grad log p(Y)||_2^2]", "grad(label=uniform,agg=mean_of_norm,norm=l2sq)", "deep"),
    ("E_{Y~U}[||grad log p(Y)||_2^2]", "grad(label=uniform,agg=mean_of_norm,norm=l2sq,bias=true)", "shallow"),
    ("||grad E_{Y~U}[log p(Y)]||_1 (GradNorm)", "gradnorm", "deep"),
    ("||grad E_{Y~U}[log p(Y)]||_1 (GradNorm)", "gradnorm(bias=true)", "shallow"),
    ("||grad E_{Y~U}[log p(Y)]||_1 (GradNorm)" + W_ONLY, "gradnorm", "shallow"),
    ("E_{Y~p}[log p/p ||grad log p(Y)||_2^2]",
     "grad(label=predicted,agg=mean_of_norm,norm=l2sq,weight=logp_over_p,bias=true)", "shallow"),
    ("E_{Y~p}[||grad log p(Y)||_2^2]", "grad(label=predicted,agg=mean_of_norm,norm=l2sq,bias=true)", "shallow"),
    ("E_{Y~p}[||grad log p(Y)||_2^2]", "grad(label=predicted,agg=mean_of_norm,norm=l2sq)", "deep"),
    ("E_{Y~p}[log p/p ||grad log p(Y)||_2^2]", "grad(label=predicted,agg=mean_of_norm,norm=l2sq,weight=logp_over_p)",
     "deep"),
    ("E_{Y~p}[||grad log p(Y)||_1] (ExGrad)", "exgrad(bias=true)", "shallow"),
    ("E_{Y~p}[||grad log p(Y)||_1] (ExGrad)" + W_ONLY, "exgrad", "shallow"),
    ("E_{Y~p}[||grad log p(Y)||_1] (ExGrad)", "exgrad", "deep"),
    ("1 - sum_k p_k(1-p_k) (ExGrad V term, as VarSum)", "varsum", "none"),
    ("sum_k |1/C - p_k| (GradNorm V term, as TV)", "tv", "none"),
]

TABLE2 = [
    ("MSP", "msp", "none"), ("Energy", "energy", "none"), ("VarSum", "varsum", "none"), ("TV", "tv", "none"),
    ("||h||_1 MSP", "norm(1)*msp", "none"), ("||h||_1 Energy", "norm(1)*energy", "none"),
    ("||h||_1 VarSum", "norm(1)*varsum", "none"),
    ("GradNorm", "gradnorm(bias=true)", "shallow"), ("ExGrad", "exgrad(bias=true)", "shallow"),
    ("GradNorm" + W_ONLY, "gradnorm", "shallow"), ("ExGrad" + W_ONLY, "exgrad", "shallow"),
]

TABLE3 = [("Deep BatchGrad", "batchgrad", "deep"), ("Shallow BatchGrad", "batchgrad(bias=true)", "shallow"),
          ("Shallow BatchGrad" + W_ONLY, "batchgrad", "shallow")]

FIGURE2 = [(f"||h||_{p} {v}", f"norm({p})*{v}", "none") for v in V_GRID for p in P_GRID]

# the scores the ImageNet claims (bench/claims.py) compare: V, ||h||_1 V, GradNorm shallow and deep, the grid
CLAIMS = [*TABLE2[:7], ("||h||_1 TV", "norm(1)*tv", "none"), ("GradNorm", "gradnorm", "shallow"),
          ("GradNorm", "gradnorm", "deep"), *FIGURE2]

# The field's post-hoc detectors (issue 9; docs/field_detectors.md), each at its paper's default setting.
# ODIN needs the model (input gradients): like the deep gradient scores it runs on the deep subset.
FIELD = [
    ("MSP", "msp", "none"), ("MaxLogit", "maxlogit", "none"), ("Energy", "energy", "none"),
    ("Entropy", "entropy", "none"), ("GEN", "gen", "none"), ("ODIN", "odin", "none"),
    ("Mahalanobis", "mahalanobis", "none"), ("Mahalanobis++", "mahalanobis(normalize=true)", "none"),
    ("RMDS", "rmds", "none"), ("KNN", "knn", "none"), ("ViM", "vim", "none"), ("NECO", "neco", "none"),
    ("fDBD", "fdbd", "none"), ("ReAct", "react", "none"), ("ASH-P", "ash_p", "none"), ("ASH-B", "ash_b", "none"),
    ("ASH-S", "ash_s", "none"), ("SCALE", "scale", "none"), ("DICE", "dice", "none"),
]

# The paper's scores beside them: the gradient scores as the paper defines them (shallow = the authors'
# weight-and-bias definition; deep GradNorm, one cotangent per sample) and its U * V products with ||h||_1 and
# its ImageNet pick ||h||_0.3 Energy. Deep ExGrad and BatchGrad join the leaderboard where another group of the
# run computes them (small: Tables 1 and 3); they are not added here, because deep ExGrad needs C backward
# passes per sample (C = 1000 for `large`).
PAPER_IN_LEADERBOARD = [
    ("GradNorm", "gradnorm(bias=true)", "shallow"), ("ExGrad", "exgrad(bias=true)", "shallow"),
    ("GradNorm", "gradnorm", "deep"),
    ("||h||_1 MSP", "norm(1)*msp", "none"), ("||h||_1 Energy", "norm(1)*energy", "none"),
    ("||h||_1 TV", "norm(1)*tv", "none"), ("||h||_1 VarSum", "norm(1)*varsum", "none"),
    ("||h||_0.3 Energy", "norm(0.3)*energy", "none"),
]

LEADERBOARD = FIELD + PAPER_IN_LEADERBOARD

# rows of other groups shown in the leaderboard when the run has them
LEADERBOARD_EXTRA = [("ExGrad", "exgrad", "deep"), ("BatchGrad", "batchgrad", "deep"),
                     ("BatchGrad", "batchgrad(bias=true)", "shallow")]

# Gradient methods published since the paper (issue 10; bench/since.py builds their section of the report)
SINCE = [
    ("GAIA-A", "gaia", "deep"),
    ("GAIA-Z", "gaia(variant=z)", "deep"),
    ("GAIA-A at the head: -T / mean_d |W^T (1 - C p)|_d [U·V, U = 1]", "gaia_v", "none"),
    ("GradOrth", "gradorth", "shallow"),
    ("GradOrth as ||S_k^T h||_2 · ||p - u||_2 [U·V]", "gradorth_u*gradorth_v", "none"),
    ("Low-dimensional gradients", "lowdim", "deep"),
    ("Low-dimensional gradients (head)", "lowdim", "shallow"),
    ("Fisher trace", "fisher", "deep"),
    ("Fisher trace", "fisher", "shallow"),
    ("Fisher trace as -||h||_2^2 (1 - ||p||_2^2) [U·V]", "sqnorm*fisher_v", "none"),
    ("GradNorm", "gradnorm", "deep"),
    ("GradNorm", "gradnorm", "shallow"),
    ("ExGrad", "exgrad", "deep"),
    ("ExGrad", "exgrad", "shallow"),
]

# the same for C = 1000 (`large`): without the deep rows that need C backward passes per sample, and without deep
# low-dim (its subspace holds P x (k + 10) float64 values, 0.75 GB for EfficientNet-Lite0's 4.7 M parameters, and its
# fit runs 4 forward + backward passes over 512 ID images at 224 px)
SINCE_C1000 = [row for row in SINCE if not (row[2] == "deep" and row[1] in ("fisher", "exgrad", "lowdim"))]

GROUPS = {"table1": TABLE1, "table2": TABLE2, "table3": TABLE3, "figure2": FIGURE2, "claims": CLAIMS,
          "leaderboard": LEADERBOARD, "since": SINCE, "since_c1000": SINCE_C1000}


def with_depth(spec: str, depth: str) -> str:
    """``gradnorm`` + ``deep`` -> ``gradnorm(depth=deep)``; ``none`` leaves the spec alone."""
    if depth in ("none", "", None):
        return spec
    if spec.endswith(")"):
        return spec[:-1] + f",depth={depth})"
    return f"{spec}(depth={depth})"


def paper_spec(spec: str, depth: str) -> str:
    """The canonical spec of a paper row (spec and depth as in ``paper_values.csv``): a shallow gradient row
    is the authors' definition, with the head's bias (``bias=true``)."""
    full = canonical_spec(with_depth(spec, depth))
    if depth == "shallow" and depth_of(full) == "shallow":
        full = canonical_spec(full[:-1] + ",bias=true)" if full.endswith(")") else f"{full}(bias=true)")
    return full


def depth_of(spec: str) -> str:
    """``deep`` / ``shallow`` for a spec with a gradient factor (its ``depth``), else ``none``."""
    from ..scores.registry import parse

    for entry, values in parse(spec):
        if entry.kind == "gradient":
            return str(values.get("depth", entry.params.get("depth", "shallow")))
    return "none"


def rows_for(groups, deep: bool = True) -> list[tuple[str, str, str]]:
    """The (label, canonical spec with depth, depth) rows of the named groups, deduplicated, in order."""
    seen, out = set(), []
    for g in groups:
        for label, spec, depth in GROUPS[g]:
            if depth == "deep" and not deep:
                continue
            full = canonical_spec(with_depth(spec, depth))
            if full not in seen:
                seen.add(full)
                out.append((label, full, depth))
    return out
