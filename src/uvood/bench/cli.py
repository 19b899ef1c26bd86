"""``uvood bench small|large [--scores ...] [--quick]``: run a benchmark and write its report."""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from pathlib import Path

from ..errors import UvoodError


def read_history(path: Path) -> list[dict]:
    """The timing records of earlier runs in an output folder (``timings.json``; [] when absent)."""
    if not path.exists():
        return []
    try:
        history = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        history = e
    if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
        raise UvoodError(f"{path} is not a list of timing records ({str(history)[:80]}), so this run could not add "
                         "its own. Repair it, move it away (e.g. to timings.json.bad) or choose another --out.")
    return history


def default_out(spec, args) -> Path:
    """Where a run writes without ``--out``: ``results/NAME`` only for the reference settings (every score,
    the spec's n, no --quick, no --deep-n), which the committed reports use; ``results/NAME-quick`` for
    --quick, ``results/NAME-partial`` for any other settings, so that no partial run overwrites a reference
    report. Both are git-ignored."""
    if args.quick:
        return Path(f"results/{spec.name}-quick")
    reference = not args.scores and args.n in (None, spec.n) and args.deep_n is None
    return Path(f"results/{spec.name}" + ("" if reference else "-partial"))


def _portable(argv: list[str]) -> list[str]:
    """The command line as a report shows it: this machine's cache and data folders become placeholders."""
    out, hide = [], {"--cache-dir": "CACHE_DIR", "--data-dir": "DATA_DIR"}
    for i, a in enumerate(argv):
        out.append(hide[argv[i - 1]] if i and argv[i - 1] in hide else a)
    return out


def _cmd_bench(args) -> int:
    from ..cli import check_out
    from ..distributed import is_writer
    from .report import write_report
    from .runner import check_known, run
    from .spec import load_spec

    spec = load_spec(args.benchmark)
    check_known(spec, args.scores)
    out = check_out(args.out or default_out(spec, args), folder=True)
    read_history(out / "timings.json")  # before any work: a bad file stops the run at once, untouched
    t = time.time()
    result = run(spec, scores=args.scores, quick=args.quick, n=args.n, data_dir=args.data_dir,
                 cache_dir=args.cache_dir, progress=not args.no_progress and is_writer(), deep_n=args.deep_n,
                 max_memory=args.max_memory, log=print if is_writer() else lambda *a, **k: None)
    if not is_writer():  # under torchrun every rank holds every row; rank 0 writes the report
        return 0
    argv = _portable(sys.argv[1:])
    command = "uvood " + " ".join(shlex.quote(a) for a in argv) if sys.argv[0].endswith("uvood") else \
        f"uvood bench {args.benchmark}" + (" --quick" if args.quick else "")
    settings = {"quick": args.quick, "n": result.meta["n_per_set"], "deep_n": args.deep_n, "scores": args.scores}
    breakdown = {k: v for k, v in result.timings.items() if v >= 0.5 and k != "total"}
    cold = result.meta["feature_sets_computed"] == result.meta["feature_sets"]  # every feature set extracted
    history = append_history(out / "timings.json", {"date": time.strftime("%Y-%m-%d %H:%M"),
                                                     "total_s": result.timings["total"], **settings, "cold": cold,
                                                     "breakdown": breakdown})
    same = [h for h in history[:-1] if all(h.get(k) == v for k, v in settings.items())]
    earlier = [h for h in same if h.get("cold")]  # a rerun's report cites the latest cold run
    path = write_report(result, out, command, cold=None if cold or not earlier else earlier[-1])
    print(f"{spec.name}: {len(result.rows)} rows in {time.time() - t:.0f} s -> {path}")
    return 0


def append_history(path: Path, record: dict, log=print) -> list[dict]:
    """Append ``record`` to the run history ``path`` (a JSON list) and return the history.

    Read, append and the atomic rewrite happen under the file's lock (:func:`uvood.cache.claim`), so
    two runs finishing together both keep their record. An unreadable history is not lost and does
    not stop the run: it is moved aside to ``timings.json.corrupt`` (one line says so) and a new one
    is started."""
    from ..cache import atomic_write, claim

    path = Path(path)
    with claim(path):
        history: list = []
        if path.exists():
            try:
                history = json.loads(path.read_text())
                if not isinstance(history, list):
                    raise ValueError("not a JSON list")
            except (OSError, UnicodeDecodeError, ValueError) as e:
                aside = path.with_name(path.name + ".corrupt")
                os.replace(path, aside)
                log(f"warning: the run history {path} is unreadable ({str(e)[:80]}); moved to {aside.name}, "
                    "starting a new one")
                history = []
        history.append(record)
        atomic_write(path, lambda f: f.write(json.dumps(history, indent=1).encode()))
    return history


def register(sub) -> None:
    from ..cli import positive_int

    p = sub.add_parser("bench", help="run a benchmark (small | large) and write tables, figures and REPORT.md")
    p.add_argument("benchmark", help="small | large | path of a spec .json")
    p.add_argument("--scores", nargs="+", help="only these score specs (default: every table's scores)")
    p.add_argument("--quick", action="store_true", help="a few hundred images per set (minutes; what CI runs)")
    p.add_argument("--n", "--images", dest="n", type=positive_int,
                   help="images per data set (default: the spec's n, or quick_n with --quick); under torchrun write "
                   "--images (torchrun takes --n for its own --nnodes)")
    p.add_argument("--deep-n", type=positive_int,
                   help="evaluate deep gradient scores / BatchGrad on an evenly spaced subset of this many images per "
                   "set (CPU time); the other scores use every image")
    p.add_argument("--data-dir", help="data folder (default: $UVOOD_DATA)")
    p.add_argument("--cache-dir", help="feature/score cache (default: $UVOOD_CACHE or ~/.cache/uvood)")
    p.add_argument("--out", help="output folder (default: results/NAME for the full reference run; "
                   "results/NAME-quick with --quick; results/NAME-partial with --scores, --n or --deep-n)")
    p.add_argument("--max-memory", type=memory_size, default=None, metavar="SIZE",
                   help="memory budget of the deep gradient pass, e.g. 2G or 500M; it sets the micro-batch and how "
                   "many label cotangents are back-propagated at once (default: about what a forward + backward of "
                   "the batch holds)")
    p.add_argument("--no-progress", action="store_true")
    from ..cli import add_device_option

    add_device_option(p)
    p.set_defaults(func=_cmd_bench)


def memory_size(text: str) -> int:
    """``2G``, ``500M``, ``1.5GB``, ``64k`` or a number of bytes -> bytes (powers of 1024)."""
    import argparse
    import re

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", str(text).lower())
    if not m or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"--max-memory {text!r} is not a size; write e.g. 2G, 500M or 1.5GB.")
    return int(float(m.group(1)) * 1024 ** "bkmgt".index(m.group(2) or "b"))
