"""The paper's ImageNet (C = 1000) claims, re-tested from a run's numbers with bootstrap intervals.

For each model (each ID set of the spec, i.e. each classifier on the ImageNet photos) and its
OOD sets O_1..O_k, with AUROC_s(O) the AUROC of score s on (ID, O):

(a) ``||h||_1 V beats V`` (Table 2, Section 4.2): for V in {MSP, Energy, VarSum, TV},
    Delta = mean_O [AUROC_{||h||_1 V}(O) - AUROC_V(O)] > 0.
(b) ``GradNorm = ||h||_1 TV up to a constant`` (Section 3, Eq. 2 with Appendix B): GradNorm
    (shallow; and deep, on the run's evenly spaced subset) and ||h||_1 TV agree:
    0 lies in the interval of Delta = mean_O [AUROC_GradNorm(O) - AUROC_{||h||_1 TV}(O)],
    both computed on the same images.
(c) ``||h||_0.3 Energy is near the best of the grid`` (Figure 2): its rank among the 48
    cells ||h||_p V by mean_O AUROC, with a bootstrap interval of that rank, and the gap to the
    best cell; it holds when the gap's interval contains 0.
(d) ``the choice of (p, V) transfers``: leave-one-OOD-set-out selection (:mod:`.selection`,
    within the model's own pairs) against the oracle scan on the test pair; it holds on a pair
    when the selected score is the oracle or the interval of AUROC_oracle - AUROC_selected
    contains 0.
(e) ``the result holds for both models``: (a)-(d) side by side per model.

Intervals: percentile bootstrap, 95 %, ``n_boot`` resamples, seed 0, ID and OOD images resampled
with replacement (:func:`uvood.metrics.bootstrap_ci`'s draws); every score of one (ID, OOD) pair
sees the same resamples (a paired bootstrap), and a mean over OOD sets is taken resample by
resample. A verdict is ``holds`` when the interval excludes 0 on the claimed side (or contains 0
for an agreement claim), ``fails`` when it excludes 0 on the other side (or excludes 0 for an
agreement claim), and ``not resolved`` otherwise. Nothing is flipped.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from .. import metrics
from ..cache import atomic_write
from ..data.datasets import subset_indices
from ..scores.registry import canonical_spec
from . import selection
from .scoresets import FIGURE2, with_depth
from .tables import md_cell

V_TERMS = {"msp": "MSP", "energy": "Energy", "varsum": "VarSum", "tv": "TV"}
HTV = "norm(1)*tv"
PAPER_CELL = selection.PAPER_CHOICE  # norm(0.3)*energy
GRADNORMS = {"shallow": canonical_spec(with_depth("gradnorm", "shallow")),
             "deep": canonical_spec(with_depth("gradnorm", "deep"))}
ALPHA = 0.05
VERSION = 1  # of the claims' definitions: part of the inputs digest of a saved claims.json


class Bootstrap:
    """Per-resample AUROCs of (ID set, OOD set, score), memoised; scores of one pair share resamples."""

    def __init__(self, scores: dict, n_boot: int = 1000, seed: int = 0):
        self.scores, self.n_boot, self.seed, self._memo = scores, n_boot, seed, {}

    def has(self, id_name: str, ood_name: str, spec: str) -> bool:
        return (id_name, id_name, spec) in self.scores and (id_name, ood_name, spec) in self.scores

    def pair(self, id_name: str, ood_name: str, spec: str, like: str | None = None) -> tuple[float, np.ndarray]:
        """(AUROC, its n_boot resampled values) of ``spec`` on (ID, OOD). With ``like``, ``spec`` is
        first restricted to the evenly spaced subset that ``like`` was evaluated on (deep rows)."""
        key = (id_name, ood_name, spec, like)
        if key not in self._memo:
            s_id, s_ood = self.scores[(id_name, id_name, spec)], self.scores[(id_name, ood_name, spec)]
            if like is not None:
                n_id, n_ood = len(self.scores[(id_name, id_name, like)]), len(self.scores[(id_name, ood_name, like)])
                s_id, s_ood = _subset(s_id, n_id), _subset(s_ood, n_ood)
            boot = metrics._bootstrap_auroc(np.asarray(s_id, np.float64), np.asarray(s_ood, np.float64),
                                            np.random.default_rng(self.seed), self.n_boot)
            self._memo[key] = (metrics.auroc(s_id, s_ood), boot)
        return self._memo[key]

    def mean(self, id_name: str, oods: list[str], spec: str, like: str | None = None) -> tuple[float, np.ndarray]:
        """Mean over OOD sets of the AUROC and of each resample's AUROC."""
        parts = [self.pair(id_name, o, spec, like) for o in oods]
        return float(np.mean([p[0] for p in parts])), np.mean([p[1] for p in parts], axis=0)


def describe() -> str:
    """This module's description of the claims and intervals, as markdown (a bullet per claim)."""
    out, para = [], []
    for line in __doc__.strip().split("\n")[2:] + [""]:
        line = line.strip()
        if not line or line[:3] in {f"({c})" for c in "abcde"}:
            if para:
                out.append(("- " if para[0].startswith("(") else "\n") + " ".join(para))
            para = [line] if line else []
        else:
            para.append(line)
    return "\n".join(out).strip() + "\n"


def _subset(s: np.ndarray, k: int) -> np.ndarray:
    keep = subset_indices(len(s), k)
    return s if keep is None else s[keep]


def interval(values: np.ndarray) -> tuple[float, float]:
    lo, hi = np.quantile(values, [ALPHA / 2, 1 - ALPHA / 2])
    return float(lo), float(hi)


def verdict(lo: float, hi: float, kind: str = "greater") -> str:
    """``greater``: holds if lo > 0, fails if hi < 0. ``agree``: holds if lo <= 0 <= hi, else fails."""
    if kind == "agree":
        return "holds" if lo <= 0 <= hi else "fails"
    return "holds" if lo > 0 else ("fails" if hi < 0 else "not resolved")


def _diff(boot: Bootstrap, id_name, oods, a: str, b: str, like: str | None = None) -> dict:
    (ma, va), (mb, vb) = boot.mean(id_name, oods, a, like if like == a else None), boot.mean(id_name, oods, b, like)
    lo, hi = interval(va - vb)
    return {"a": a, "b": b, "auroc_a": ma, "auroc_b": mb, "delta": ma - mb, "ci_low": lo, "ci_high": hi,
            "ci_a": interval(va), "ci_b": interval(vb)}


def claim_a(boot: Bootstrap, id_name: str, oods: list[str]) -> list[dict]:
    out = []
    for v in V_TERMS:
        if all(boot.has(id_name, o, s) for o in oods for s in (v, f"norm(1)*{v}")):
            d = _diff(boot, id_name, oods, f"norm(1)*{v}", v)
            out.append({**d, "v": v, "verdict": verdict(d["ci_low"], d["ci_high"]),
                        "sets_better": sum(boot.pair(id_name, o, f"norm(1)*{v}")[0] > boot.pair(id_name, o, v)[0]
                                           for o in oods)})
    return out


def claim_b(boot: Bootstrap, id_name: str, oods: list[str]) -> list[dict]:
    out = []
    for depth, spec in GRADNORMS.items():
        if all(boot.has(id_name, o, s) for o in oods for s in (spec, HTV)):
            d = _diff(boot, id_name, oods, spec, HTV, like=spec)  # ||h||_1 TV on GradNorm's images
            n_id = len(boot.scores[(id_name, id_name, spec)])
            out.append({**d, "depth": depth, "n_id": n_id, "verdict": verdict(d["ci_low"], d["ci_high"], "agree")})
    return out


def claim_c(boot: Bootstrap, id_name: str, oods: list[str]) -> dict | None:
    cells = [s for _, s, _ in FIGURE2 if all(boot.has(id_name, o, s) for o in oods)]
    if PAPER_CELL not in cells:
        return None
    means = {s: boot.mean(id_name, oods, s) for s in cells}
    order = sorted(cells, key=lambda s: -means[s][0])
    rank = order.index(PAPER_CELL) + 1
    stack = np.stack([means[s][1] for s in cells])  # cells x resamples
    ranks = 1 + (stack > stack[cells.index(PAPER_CELL)]).sum(0)  # rank of the paper's cell in each resample
    best = order[0]
    gap = means[best][1] - means[PAPER_CELL][1]
    lo, hi = interval(gap)
    return {"cell": PAPER_CELL, "rank": rank, "of": len(cells), "auroc": means[PAPER_CELL][0], "best": best,
            "best_auroc": means[best][0], "rank_ci": (int(np.quantile(ranks, ALPHA / 2)),
                                                      int(np.quantile(ranks, 1 - ALPHA / 2))),
            "gap": means[best][0] - means[PAPER_CELL][0], "ci_low": lo, "ci_high": hi,
            "verdict": "holds" if best == PAPER_CELL or lo <= 0 else "fails"}


def claim_d(result, boot: Bootstrap, id_name: str) -> list[dict]:
    pairs = [(i, o) for i, o in result.spec.pairs if i == id_name]
    out = []
    for r in selection.leave_one_ood_out(result, pairs=pairs):
        if r["selected"] == r["oracle"]:
            lo = hi = 0.0
        else:
            va, vb = boot.pair(id_name, r["ood"], r["oracle"])[1], boot.pair(id_name, r["ood"], r["selected"])[1]
            lo, hi = interval(va - vb)
        out.append({**r, "gap": r["oracle_auroc"] - r["selected_auroc"], "ci_low": lo, "ci_high": hi,
                    "verdict": "holds" if lo <= 0 else "fails"})
    return out


def evaluate(result, n_boot: int = 1000, seed: int = 0) -> dict:
    """Every claim per model (ID set of the spec): {id_name: {"model", "oods", "a", "b", "c", "d"}}."""
    boot = Bootstrap(result.scores, n_boot, seed)
    out = {}
    for id_name, model in result.spec.models.items():
        oods = [o for i, o in result.spec.pairs if i == id_name]
        if not oods:
            continue
        out[id_name] = {"model": model, "oods": oods, "a": claim_a(boot, id_name, oods),
                        "b": claim_b(boot, id_name, oods), "c": claim_c(boot, id_name, oods),
                        "d": claim_d(result, boot, id_name)}
    return out


def inputs_digest(result, n_boot: int = 1000, seed: int = 0) -> str:
    """sha256 of everything :func:`evaluate` reads (the scores, pairs, AUROC rows, n_boot, seed)."""
    d = hashlib.sha256(json.dumps([VERSION, n_boot, seed, result.spec.pairs, sorted(result.spec.models.items()),
                                   sorted((r["id"], r["ood"], r["score"], r["auroc"]) for r in result.rows)]).encode())
    for key in sorted(result.scores):
        d.update(json.dumps(key).encode())
        d.update(np.ascontiguousarray(result.scores[key], np.float64).tobytes())
    return d.hexdigest()


def evaluate_cached(result, path: Path, n_boot: int = 1000, seed: int = 0) -> dict:
    """:func:`evaluate`, reusing ``path`` (a claims.json written by this function) when it was made from the
    same inputs (:func:`inputs_digest`); else computed and written atomically. The bootstrap of the 48-cell
    grid is the costly part (tens of seconds); a warm rerun gets the same numbers from the file."""
    digest = inputs_digest(result, n_boot, seed)
    try:
        saved = json.loads(Path(path).read_text())
        if saved.get("digest") == digest:
            return saved["claims"]
    except (OSError, ValueError, AttributeError):
        pass  # absent or unreadable: recompute
    found = evaluate(result, n_boot, seed)
    text = json.dumps({"digest": digest, "n_boot": n_boot, "seed": seed, "claims": found}, indent=1, default=_plain)
    atomic_write(Path(path), lambda f: f.write(text.encode()))
    return json.loads(text)["claims"]


def _plain(value):
    return value.item() if isinstance(value, np.generic) else str(value)


def _overall(items: list[dict]) -> str:
    verdicts = [i["verdict"] for i in items]
    if not verdicts:
        return "no data"
    if all(v == "holds" for v in verdicts):
        return "holds"
    return "fails" if all(v == "fails" for v in verdicts) else "partly"


def summary(claims: dict) -> list[dict]:
    """One row per claim: its verdict per model and (e) whether it holds for every model."""
    rows = []
    texts = {"a": "(a) ||h||_1 V beats V, for every V", "b": "(b) GradNorm and ||h||_1 TV agree within CIs",
             "c": "(c) ||h||_0.3 Energy is near the best grid cell", "d": "(d) leave-one-OOD-set-out selection "
             "matches the oracle"}
    for key, text in texts.items():
        per = {}
        for id_name, c in claims.items():
            per[id_name] = (c[key]["verdict"] if c[key] else "no data") if key == "c" else _overall(c[key])
        both = "yes" if per and all(v == "holds" for v in per.values()) else "no"
        rows.append({"claim": text, "verdicts": per, "all_models": both})
    return rows


def _ci(lo: float, hi: float) -> str:
    return f"[{lo:+.3f}, {hi:+.3f}]"


def markdown(claims: dict, timings: dict | None = None) -> str:
    """The claims table (e) and the detail of (a)-(d) per model, as markdown."""
    if not claims:
        return "(no model with OOD pairs: no claim to test)\n"
    ids = list(claims)
    L = ["| claim | " + " | ".join(f"{i} (`{claims[i]['model']}`)" for i in ids) + " | (e) holds for every model |",
         "|" + "---|" * (len(ids) + 2)]
    for row in summary(claims):
        L.append(f"| {md_cell(row['claim'])} | " + " | ".join(f"**{row['verdicts'][i]}**" for i in ids)
                 + f" | **{row['all_models']}** |")
    for id_name, c in claims.items():
        L += ["", f"### {id_name} (`{c['model']}`), OOD sets: {', '.join(c['oods'])}", "",
              "(a) mean AUROC over the OOD sets, ||h||_1 V against V (Δ = ours with ||h||_1 − without):", "",
              md_cell("| V | V | ||h||_1 V | Δ | 95 % CI of Δ | sets where ||h||_1 V is higher | verdict |", row=True),
              "|---|---|---|---|---|---|---|"]
        for r in c["a"]:
            L.append(f"| {V_TERMS[r['v']]} | {r['auroc_b']:.3f} | {r['auroc_a']:.3f} | {r['delta']:+.3f} | "
                     f"{_ci(r['ci_low'], r['ci_high'])} | {r['sets_better']} of {len(c['oods'])} | {r['verdict']} |")
        L += ["", "(b) GradNorm against ||h||_1 TV on the same images (mean AUROC over the OOD sets):", "",
              md_cell("| GradNorm | n ID | GradNorm | its CI | ||h||_1 TV | its CI | Δ | 95 % CI of Δ | verdict "
                      "| time |", row=True),
              "|---|---|---|---|---|---|---|---|---|---|"]
        for r in c["b"]:
            secs = _seconds(timings, c["model"], r["a"]) if r["depth"] == "deep" else None
            L.append(f"| {r['depth']} | {r['n_id']} | {r['auroc_a']:.3f} | {_ci(*r['ci_a'])} | {r['auroc_b']:.3f} | "
                     f"{_ci(*r['ci_b'])} | {r['delta']:+.3f} | {_ci(r['ci_low'], r['ci_high'])} | {r['verdict']} | "
                     + (f"{secs:.0f} s |" if secs is not None else "– |"))
        cc = c["c"]
        if cc:
            L += ["", f"(c) `{cc['cell']}` ranks **{cc['rank']} of {cc['of']}** grid cells by mean AUROC "
                  f"({cc['auroc']:.3f}; bootstrap rank interval {cc['rank_ci'][0]}–{cc['rank_ci'][1]}); the best cell "
                  f"is `{cc['best']}` ({cc['best_auroc']:.3f}), gap {cc['gap']:+.3f}, 95 % CI "
                  f"{_ci(cc['ci_low'], cc['ci_high'])}: **{cc['verdict']}**."]
        if c["d"]:
            L += ["", "(d) leave-one-OOD-set-out selection within this model's pairs against the oracle:", "",
                  "| test OOD set | selected | its AUROC | oracle | oracle AUROC | gap | 95 % CI of gap | verdict |",
                  "|---|---|---|---|---|---|---|---|"]
            for r in c["d"]:
                L.append(f"| {r['ood']} | `{r['selected']}` | {r['selected_auroc']:.3f} | `{r['oracle']}` | "
                         f"{r['oracle_auroc']:.3f} | {r['gap']:+.3f} | {_ci(r['ci_low'], r['ci_high'])} | "
                         f"{r['verdict']} |")
    failed = [f"{row['claim']} ({', '.join(i for i, v in row['verdicts'].items() if v != 'holds')})"
              for row in summary(claims) if row["all_models"] != "yes"]
    L += ["", ("**Claims that do not hold here (for the models named):** " + "; ".join(failed) + ".") if failed
          else "Every claim holds for every model."]
    return "\n".join(L) + "\n"


def _seconds(timings: dict | None, model: str, spec: str) -> float | None:
    """Seconds spent on ``spec`` for ``model`` over its data sets (the run's time breakdown)."""
    if not timings:
        return None
    vals = [v for k, v in timings.items() if k.startswith(f"{model}/") and k.endswith(f"/{spec}")]
    return float(sum(vals)) if vals else None
