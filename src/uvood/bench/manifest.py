"""``run.json``: the machine-readable manifest of a benchmark run, written beside ``results.csv``.

It says what produced the numbers: uvood's version and git revision (when the code is a git
checkout), the models' fingerprints (sha256 of their weights), the data sets' identities, the
code versions of every score, of the features, the deep label norms, the metrics and the path of the
convolution weight-gradient norms (the same versions that key the caches), the metric conventions and
the run's settings.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from .. import metrics
from ..cache import atomic_write
from .runner import RunResult

MANIFEST = "run.json"


def git_revision(where: Path | None = None, outputs: Path | None = None) -> dict | None:
    """``{"commit": sha, "dirty": bool}`` of the git checkout holding uvood's code, or None. ``dirty``: a tracked
    file has uncommitted changes, not counting those under ``outputs`` (the run's own output folder, e.g. the
    committed ``results/small`` that a rerun rewrites: the flag is about the code and data that made the run)."""
    where = Path(where or Path(__file__).resolve().parent)

    def git(*args, strip: bool = True) -> str:
        out = subprocess.run(["git", "-C", str(where), *args], capture_output=True, text=True, timeout=10,
                             check=True).stdout
        return out.strip() if strip else out

    try:
        commit = git("rev-parse", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no", "-z", strip=False).split("\0")  # "XY path"
        top = Path(git("rev-parse", "--show-toplevel")).resolve()
    except (OSError, subprocess.SubprocessError):
        return None
    out = Path(outputs).resolve() if outputs is not None else None
    paths, entries = [], iter(changed)
    for entry in entries:  # "XY path"; a rename or copy ("R"/"C") is followed by its source path
        if len(entry) > 3:
            paths.append(top / entry[3:])
            if entry[0] in "RC":
                next(entries, None)
    dirty = any(out is None or not path.resolve().is_relative_to(out) for path in paths)
    return {"commit": commit, "dirty": dirty}


def manifest(result: RunResult, command: str, out: Path | None = None) -> dict:
    """The manifest of ``result`` as a JSON-ready dict (module docstring)."""
    from .. import __version__

    meta, spec = result.meta, result.spec
    versions = meta.get("versions", {})
    return {
        "uvood": __version__,
        "git": git_revision(outputs=out),
        "command": command,
        "benchmark": {"name": spec.name, "version": spec.version},
        "models": {k: {"model": m["model"], "fingerprint": m.get("fingerprint")} for k, m in result.models.items()},
        "data": {k: d["identity"] for k, d in result.datasets.items()},
        "versions": {"features": versions.get("features"), "label_norms": versions.get("label_norms"),
                     "metrics": versions.get("metrics"), "conv_weight_norms": versions.get("conv_weight_norms")},
        "score_versions": versions.get("scores", {}),
        "metric_conventions": {**metrics.CONVENTIONS, "fpr": f"FPR at TPR = {spec.metric['tpr']} with positive = "
                               f"{spec.metric['fpr_positive']!r}", **{f"fpr_{k}": v for k, v in spec.metric.items()},
                               "n_boot": meta.get("n_boot"), "bootstrap_seed": 0},
        "settings": {k: meta.get(k) for k in ("quick", "n_per_set", "deep_n", "scores", "cross_domain")},
        "environment": {"torch": meta.get("torch"), "threads": meta.get("threads"), "machine": meta.get("machine")},
    }


def write_manifest(result: RunResult, out: Path, command: str) -> Path:
    """Write ``run.json`` under ``out`` (atomically) and return its path."""
    path = Path(out) / MANIFEST
    text = json.dumps(manifest(result, command, out), indent=1)
    atomic_write(path, lambda f: f.write(text.encode()))
    return path
