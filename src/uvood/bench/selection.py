"""Honest selection of the encoding-output score (p, V) without touching the test OOD set.

The paper picked ||h||_0.3 x Energy by scanning p on the benchmark's test sets (and says so).
Here, for each test pair (ID, OOD), the score is chosen on the *other* OOD sets only: the pairs
whose OOD set differs from the test pair's (leave-one-OOD-set-out). ID data may be used, as a
deployer has it. The selected score's test AUROC is reported beside the oracle (the best score
on the test pair itself, i.e. the paper's kind of scan) and the paper's fixed choice.
"""

from __future__ import annotations

import numpy as np

from .runner import RunResult
from .scoresets import FIGURE2

PAPER_CHOICE = "norm(0.3)*energy"


def leave_one_ood_out(result: RunResult, candidates: list[str] | None = None,
                      pairs: list[tuple[str, str]] | None = None) -> list[dict]:
    """Per test pair, the candidate with the best mean AUROC on the other OOD sets' pairs (among
    ``pairs``, default the spec's; e.g. one model's pairs only), beside the oracle."""
    cands = candidates or [s for _, s, _ in FIGURE2]
    auroc = {(r["id"], r["ood"], r["score"]): r["auroc"] for r in result.rows}
    pairs = result.spec.pairs if pairs is None else pairs
    out = []
    for id_name, ood_name in pairs:
        train = [(a, b) for a, b in pairs if b != ood_name]
        usable = [s for s in cands if (id_name, ood_name, s) in auroc]
        if not train or not usable:
            continue
        mean_train = {s: np.mean([auroc[(a, b, s)] for a, b in train if (a, b, s) in auroc]) for s in usable}
        chosen = max(usable, key=lambda s: mean_train[s])
        oracle = max(usable, key=lambda s: auroc[(id_name, ood_name, s)])
        out.append({"id": id_name, "ood": ood_name, "selected_on": "; ".join(f"{a}→{b}" for a, b in train),
                    "selected": chosen, "selected_auroc": auroc[(id_name, ood_name, chosen)],
                    "oracle": oracle, "oracle_auroc": auroc[(id_name, ood_name, oracle)],
                    "paper_choice_auroc": auroc.get((id_name, ood_name, PAPER_CHOICE))})
    return out


def markdown(rows: list[dict]) -> str:
    if not rows:
        return "(no pair has another OOD set to select on)\n"
    lines = ["| test pair | selected on | selected score | its test AUROC | oracle (scan on test) | oracle AUROC "
             f"| {PAPER_CHOICE} |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        pc = "–" if r["paper_choice_auroc"] is None else f"{r['paper_choice_auroc']:.3f}"
        lines.append(f"| {r['id']} → {r['ood']} | {r['selected_on']} | `{r['selected']}` | {r['selected_auroc']:.3f} "
                     f"| `{r['oracle']}` | {r['oracle_auroc']:.3f} | {pc} |")
    sel = np.mean([r["selected_auroc"] for r in rows])
    ora = np.mean([r["oracle_auroc"] for r in rows])
    lines.append(f"| **mean** | | | {sel:.3f} | | {ora:.3f} | |")
    return "\n".join(lines) + "\n"
