"""REPORT.md of a run: what ran, on which models and data, the tables beside the paper's,
figures, honest selection, orientation notes and a discussion computed from the numbers."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np

from ..scores.registry import canonical_spec
from . import claims, figures, leaderboard, selection, since, tables
from .manifest import MANIFEST, write_manifest
from .runner import RunResult
from .scoresets import TABLE1, paper_spec, with_depth

CAVEATS = {
    "small": [
        "**Fashion-MNIST stands in for SVHN**, which cannot be obtained here; the paper's SVHN columns are shown "
        "beside our Fashion-MNIST columns for reference only — they are different data sets and models.",
        "**CIFAR-10 is a JPEG copy** (quality 75, about 28 dB PSNR), not the official pixels; the CIFAR-10 model "
        "was trained and tested on that copy.",
        "The classifiers are our own zoo models of the paper's architectures (pytorch-playground family), trained "
        "here; the paper used the pytorch-playground checkpoints. Where the CIFAR-10 model is the CPU fallback "
        "(a narrower network than the paper's c = 128), this is marked in the models table.",
    ],
    "large": [
        "**Not the paper's ImageNet benchmark.** The paper used BiT-S ResNetv2-101 on the ImageNet-1k val set "
        "(50,000 images) against iNaturalist, SUN, Places and Textures. Here: two other ImageNet-1k classifiers "
        "(EfficientNet-Lite0 and -Lite2, C = 1000), **1,000 real ImageNet photos, one per class** as ID, the **DTD "
        "Textures subset** (10 of 47 classes, 1,200 images) as OOD, and MNIST / Fashion-MNIST as far-OOD sets "
        "(the paper has no such pairs). iNaturalist, SUN and Places are not reachable here.",
        "**The photos' ImageNet split is unknown** (a public sample collection): they may be training images of "
        "these models, which would make the ID set easier than ImageNet val (the top-1 accuracies in the models "
        "table are higher than the models' published val accuracies, about 75 % and 77 %).",
        "Each model sees every image through the standard ImageNet evaluation transform at its own resolution "
        "(shorter side to S / 0.875, central S x S crop; S = 224 for Lite0, 260 for Lite2); the photos were "
        "stored at 256 x 256, the textures at their own size (about 300–640 px), the digits at 28 px, grey "
        "copied to RGB.",
        "The paper's Figure 2 average runs over its 4 OOD sets; ours over our 3, per model. Appendix C gives no "
        "Textures heatmap, so no per-set paper value exists for our OOD sets. Averages (Table 2, Figure 2) are "
        "per model.",
        "Deep GradNorm is computed on an evenly spaced subset of each set (see the `n_id` / `n_ood` columns and "
        "claim (b)); every other score on all images.",
    ],
}


def _mean_auroc(result: RunResult, spec: str) -> float | None:
    vals = [r["auroc"] for r in result.rows if r["score"] == spec]
    return float(np.mean(vals)) if vals else None


def orientation_notes(result: RunResult) -> list[str]:
    """Cells where the paper's value is closer to 1 - ours than to ours: a likely flipped AUROC there."""
    notes = []
    for r in result.rows:
        pv = tables._paper_value(result, r["id"], r["ood"], r["score"])
        if pv is None:
            continue
        if r["auroc"] < 0.5 <= pv and abs((1 - r["auroc"]) - pv) < abs(r["auroc"] - pv):
            notes.append(f"{r['id']} → {r['ood']}, `{r['score']}`: ours {r['auroc']:.3f} (reported as is), paper "
                         f"{pv:.3f}; 1 − ours = {1 - r['auroc']:.3f}. The seed code flipped AUROCs below 0.5, "
                         "so the paper's number may be a flipped one.")
    return notes


def discussion(result: RunResult) -> list[str]:
    out = []
    v_only = {s: _mean_auroc(result, s) for s in ("msp", "energy", "varsum", "tv")}
    grads = {canonical_spec(with_depth(s, d)): None for _, s, d in TABLE1 if d != "none"}
    grads = {k: _mean_auroc(result, k) for k in grads}
    grads = {k: v for k, v in grads.items() if v is not None}
    v_only = {k: v for k, v in v_only.items() if v is not None}
    if v_only and grads:
        bv, bg = max(v_only, key=v_only.get), max(grads, key=grads.get)
        verdict = "holds" if v_only[bv] >= grads[bg] else "does not hold"
        out.append(f"*V-only vs gradients.* Best V-only score: `{bv}` (mean AUROC {v_only[bv]:.3f}); best gradient "
                   f"score: `{bg}` ({grads[bg]:.3f}). The paper's claim that output-only scores are at least as "
                   f"good as the gradient scores on this benchmark **{verdict}** here.")
    pairs = [(canonical_spec(with_depth(s, "deep")), paper_spec(s, "shallow"))
             for _, s, d in TABLE1 if d == "deep"]
    deep_better = [(d, _mean_auroc(result, d), _mean_auroc(result, s)) for d, s in pairs]
    deep_better = [(d, a, b) for d, a, b in deep_better if a is not None and b is not None]
    if deep_better:
        wins = [d for d, a, b in deep_better if a > b + 0.005]
        out.append(f"*Deep vs shallow.* Deep gradients beat their shallow twin (by > 0.005 mean AUROC) for "
                   f"{len(wins)} of {len(deep_better)} expressions" + (f": {', '.join(f'`{w}`' for w in wins)}."
                                                                        if wins else "."))
    u = {v: (_mean_auroc(result, v), _mean_auroc(result, f"norm(1)*{v}")) for v in ("msp", "energy", "varsum")}
    u = {k: x for k, x in u.items() if None not in x}
    if u:
        helped = [k for k, (a, b) in u.items() if b > a]
        changes = ", ".join(f"{k}: {a:.3f} → {b:.3f}" for k, (a, b) in u.items())
        out.append(f"*Does ||h||_1 help?* Multiplying by ||h||_1 raised the mean AUROC for "
                   f"{len(helped)} of {len(u)} V terms ({changes})."
                   + " The paper found it helps with C = 1000 (ImageNet) but not on average with C = 10.")
    return out


def time_breakdown(timings: dict[str, float], top: int = 12) -> list[str]:
    """Markdown: where a run's wall time went, by kind of work and by the largest single items."""
    items = {k: v for k, v in timings.items() if k.count("/") == 2}  # model/data set/what
    if not items:
        return []
    kinds = {k: v for k, v in timings.items() if "/" not in k and k != "total"}  # e.g. the metrics
    for k, v in items.items():
        kind = k.split("/")[2]
        kinds[kind] = kinds.get(kind, 0.0) + v
    total = timings.get("total") or sum(items.values())
    L = ["| work | seconds | share |", "|---|---|---|"]
    L += [f"| {k} | {v:.0f} | {100 * v / total:.0f} % |" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])
          if v >= 1]
    L += ["", "Largest single items (model / data set / work):", "", "| item | seconds |", "|---|---|"]
    L += [f"| {k} | {v:.0f} |" for k, v in sorted(items.items(), key=lambda kv: -kv[1])[:top]]
    return L


def write_report(result: RunResult, out: Path, command: str, cold: dict | None = None) -> Path:
    """Write tables, figures and ``REPORT.md`` under ``out``; return the report's path. ``cold`` is the
    timings entry of the first run with the same settings (cold caches), if this run is a rerun."""
    out = Path(out)
    md_tables = tables.write_all(result, out)
    figs = figures.write_all(result, out)
    sel = [r for _, pairs in tables.average_groups(result) for r in selection.leave_one_ood_out(result, pairs=pairs)]
    tables.write_text(out / "selection.json", json.dumps(sel, indent=1))
    man = json.loads(write_manifest(result, out, command).read_text())
    git = man["git"]
    revision = (f"git {git['commit'][:12]}" + (" with uncommitted changes" if git["dirty"] else "")) if git else \
        "no git revision"
    spec = result.spec
    quick = " (QUICK run: few images, not the reported results)" if result.quick else ""
    L = [f"# uvood benchmark `{spec.name}`{quick}",
         "", spec.description, "",
         f"- Command: `{command}`",
         f"- Date: {dt.date.today().isoformat()}; machine: {result.meta['machine']}; torch {result.meta['torch']} "
         f"({result.meta['threads']} threads)",
         f"- Images per data set: up to {result.meta['n_per_set']} (test split; evenly spaced subset if fewer)"
         + (f"; **deep gradient scores and BatchGrad on an evenly spaced subset of {result.meta['deep_n']} per set** "
            "(CPU time; see the `n_id`/`n_ood` columns)" if result.meta.get("deep_n") else ""),
         f"- Cross-domain convention: `{spec.cross_domain}`; FPR at {int(spec.metric['tpr'] * 100)} % TPR with "
         f"positive = {spec.metric['fpr_positive']!r} (share of OOD accepted when 95 % of ID is kept)",
         f"- Manifest: [`{MANIFEST}`]({MANIFEST}) — uvood {man['uvood']} ({revision}), model fingerprints, data "
         "identities, score / feature / metric code versions (the cache keys), metric conventions (AUPR = average "
         "precision, not the trapezoid) and settings",
         "- Wall time of this run (caches and computation to metric rows; imports and figures not included): "
         f"{result.timings.get('total', 0):.0f} s"
         + (f"; last cold-cache run with these settings ({cold['date']}): {cold['total_s']:.0f} s" if cold else "")
         + " (see *Where the time goes*)", "",
         "Shallow gradient rows (Tables 1-3) differentiate the head's weight and bias, as the authors' code does "
         "(`bias=true`, h̃ = [h, 1]); the rows marked `[W only]` differentiate the weight alone, which is 0 for an "
         "input with h = 0 (docs/gradient_scores.md, *Degenerate encodings*).", "",
         "All scores are oriented *higher = more in-distribution* and every AUROC is reported as computed: "
         "nothing is flipped. 95 % bootstrap intervals (1,000 resamples, seed 0) are in the CSVs "
         "(`ci_low`, `ci_high`). Cells read **ours (paper)**.", "", "## Caveats", ""]
    L += [f"- {c}" for c in CAVEATS.get(spec.name, [])]
    L += ["", "## Models", "", "| ID set | model | accuracy on the ID test images used | full-test accuracy "
          "(metadata) | width c | CPU fallback | trained on |", "|---|---|---|---|---|---|---|"]
    for id_name, m in result.models.items():
        acc = "–" if m["accuracy_on_id"] is None else f"{100 * m['accuracy_on_id']:.2f} %"
        full = "–" if m.get("test_accuracy") is None else f"{100 * m['test_accuracy']:.2f} %"
        L.append(f"| {id_name} | `{m['model']}` | {acc} (n = {m['n']}) | {full} | {m.get('c') or '–'} | "
                 f"{'**yes**' if m.get('cpu_fallback') else 'no'} | {m.get('device') or '–'} |")
    if spec.cross_domain == "imagenet":
        L += ["", "Accuracy = top-1 on the ImageNet photos, which may be training images of these models (their "
              "ImageNet split is unknown): it is not an ImageNet val accuracy."]
    sections = [("table1", "Table 1 and Appendix A: the gradient family, deep and shallow"),
                ("table2", "Table 2: V only, ||h||_1 · V, and the (shallow) gradient scores"),
                ("table3", "Table 3 and its appendix table: BatchGrad"),
                ("figure2", "Figure 2 / Appendix C: ||h||_p · V, average AUROC over pairs")]
    for key, title in sections:
        if key in md_tables:
            L += ["", f"## {title}", "", md_tables[key]]
            if key == "figure2":
                L += ["![average heatmap](figure2_average.png)", ""] if "figure2_average.png" in figs else []
                L += [f"![{f}]({f})" for f in figs if f.startswith("heatmap_")]
                if spec.name != "large":
                    L += ["", "The paper gives these heatmaps for ImageNet only; no paper value exists for this "
                          "benchmark's cells."]
    # the cold run's breakdown (this run's own when it is the first with these settings)
    source = {**cold.get("breakdown", {}), "total": cold["total_s"]} if cold else result.timings
    if "claims" in spec.groups:
        found = claims.evaluate_cached(result, out / "claims.json")
        L += ["", "## The paper's ImageNet claims, tested", "", claims.describe(), "", claims.markdown(found, source)]
    if {"since", "since_c1000"} & set(spec.groups):
        L += [""] + since.section(result)
    if "leaderboard" in spec.groups:
        lines, rows = leaderboard.section(result)
        tables.write_csv(rows, out / "leaderboard.csv", leaderboard.CSV_COLUMNS)
        L += ["", "## Leaderboard: the field's post-hoc detectors beside the paper's scores", ""] + lines
    L += ["", "## Honest selection of (p, V)", "", " ".join(selection.__doc__.strip().split("\n")[2:]), "",
          selection.markdown(sel), "## Figure 1: V terms on the simplex", "", "![simplex](figure1_simplex.png)", "",
          "## ROC curves", ""]
    L += [f"![{f}]({f})" for f in figs if f.startswith("roc_")]
    notes = orientation_notes(result)
    L += ["", "## Orientation: where the paper's value looks flipped", "",
          "A heuristic list: cells where our AUROC is below 0.5 and the paper's value is closer to 1 − ours than to "
          "ours. It is only evidence where the data and model match the paper's; for stand-in columns (another data "
          "set or model than the paper's) it is shown for completeness. The predicted-label norm-of-mean rows are "
          "identically zero in exact arithmetic (docs/gradient_scores.md): the deep row is computed as its closed "
          "form 0 (AUROC 0.5); the shallow row's AUROC measures rounding noise.",
          ""]
    L += [f"- {n}" for n in notes] if notes else ["No cell where the paper's value is closer to 1 − ours than to ours."]
    L += ["", "## Discussion", ""] + [f"- {d}" for d in discussion(result)]
    breakdown = time_breakdown(source)
    if breakdown:
        L += ["", "## Where the time goes", "",
              ("The last cold-cache run with these settings" if cold else "This run") + ", by kind of work "
              "(seconds summed over models and data sets; a rerun only reads caches):", ""] + breakdown
    L += ["", "## Files", "", f"`{MANIFEST}` (what produced these numbers), "
          "`results.csv` (every pair × score, stable columns), `table1.csv`, `table2.csv`, "
          "`table3.csv`, `figure2.csv`, `leaderboard.csv`, "
          "`selection.json`, the PNG figures. Regenerate with the command above.", ""]
    path = out / "REPORT.md"
    tables.write_text(path, "\n".join(L))
    return path
