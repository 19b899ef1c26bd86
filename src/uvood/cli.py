"""The ``uvood`` command line: one entry point, subcommands per stage of the pipeline.

    uvood demo                      offline demo on the bundled MNIST / Fashion-MNIST sample
    uvood scores                    the registry of score names
    uvood score --model M --data D --score SPEC --out scores.csv
    uvood data ... / uvood zoo ... / uvood bench ...
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from .errors import UvoodError


def _cmd_scores(args) -> int:
    from .scores.registry import entries

    kinds = {"output": "V terms (output)", "encoding": "U terms (encoding)", "gradient": "gradient scores"}
    by_kind: dict[str, list] = {}
    for e in entries().values():
        by_kind.setdefault(e.kind, []).append(e)
    for kind, title in kinds.items():
        print(f"{title}:")
        for e in sorted(by_kind.get(kind, []), key=lambda e: e.name):
            params = ", ".join(k if k in e.positional else f"{k}={v}" for k, v in e.params.items())
            first = (e.doc or "").strip().splitlines()[0] if e.doc else ""
            print(f"  {e.name + ('(' + params + ')' if params else ''):<60} {first}")
    print("\nCombine terms with '*', e.g. norm(0.3)*energy, norm(inf)*tv.")
    return 0


def _load_model(name: str):
    from . import zoo

    return zoo.load(name)


def _read_user_images(path: Path):
    """(images, labels or None, names) from an .npz in either format or a folder of images."""
    import numpy as np

    from .data import formats

    if not path.exists():
        raise UvoodError(f"No data at {path}: pass an .npz file (decoded or JPEG format) or a folder of images.")
    if path.is_dir():
        images, y, classes = formats.read_image_folder(path)
        return images, y, [f"{classes[c]}/{i}" for i, c in enumerate(y)]
    arrays = formats.read_npz(path, ())
    if {"data", "offsets"} <= set(arrays):
        archive = formats.JpegArchive(path, num_classes=2**31 - 1, allow_unlabelled=True)
        return archive, archive.y, [str(n) for n in archive.names]
    if "x" not in arrays:
        raise UvoodError(f"{path} has keys {sorted(arrays)}: expected 'x' (and 'y') for decoded images, or "
                         "'data', 'offsets', 'y', 'names' for JPEG bytes (see the data README).")
    x = arrays["x"]  # any layout of uvood.validation.LAYOUT_RULE; checked by transforms.to_model_format
    y = arrays.get("y")
    return x, (None if y is None else np.asarray(y)), list(range(len(x)))


def _load_inputs(path: str, model_name: str, args):
    """Read DATA into the model's input format (C, H, W from the zoo metadata)."""
    from . import zoo
    from .data import transforms

    images, y, names = _read_user_images(Path(path))
    c, h, _ = zoo.info(model_name)["input"]
    return transforms.to_model_format(images, channels=c, size=h, mode=args.cross_domain), y, names


def _cmd_score(args) -> int:
    from .api import score_features, score_model
    from .features import extract
    from .scores.registry import get_score

    model = _load_model(args.model)
    x, y, names = _load_inputs(args.data, args.model, args)
    specs = args.score or ["norm(0.3)*energy"]
    scores = [get_score(s) for s in specs]
    feats = extract(model, x, batch_size=args.batch_size, progress=True, desc="features", dtype=args.dtype)
    cols = {}
    for sc in scores:
        if sc.needs_model:
            cols[sc.spec] = score_model(sc, model, x, batch_size=args.batch_size, progress=True, dtype=args.dtype)
        else:
            cols[sc.spec] = score_features(sc, feats.h, feats.logits)
    pred = feats.logits.argmax(1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "name", "label", "prediction", *cols])
        for i in range(len(feats)):
            label = "" if y is None or int(y[i]) < 0 else int(y[i])
            w.writerow([i, names[i] if names is not None else i, label, int(pred[i]),
                        *(repr(float(c[i])) for c in cols.values())])
    print(f"wrote {len(feats)} rows x {len(cols)} score(s) to {out}")
    return 0


def _cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(verbose=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="uvood", description="Post-hoc OOD detection for PyTorch classifiers "
                                     "(gradient scores, encoding-output scores, metrics, benchmarks).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("demo", help="offline demo: the zoo's MNIST model on bundled MNIST / Fashion-MNIST images")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("scores", help="list the registry of score names")
    p.set_defaults(func=_cmd_scores)

    p = sub.add_parser("score", help="score inputs with a model and write one CSV row per input")
    p.add_argument("--model", required=True, help="a zoo name (uvood zoo list) or a zoo-format checkpoint path")
    p.add_argument("--data", required=True,
                   help="an .npz with 'x' (and optional 'y'), a JPEG-format .npz, or a folder of images. 'x' may be "
                   "N x H x W (greyscale), N x H x W x C or N x C x H x W (C = 1 or 3; a 4-D array is N x C x H x W "
                   "when its second axis is 1 or 3), uint8 (0..255) or float in [0, 1]")
    p.add_argument("--score", action="append", help="a score spec (repeatable), e.g. 'norm(0.3)*energy'")
    p.add_argument("--out", default="scores.csv", help="output CSV path")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--dtype", choices=["float32", "float64"], default=None,
                   help="run the model in this dtype (default: its own); float64 makes deep gradient scores of an "
                   "image independent of the batch it is in (float32 rounding can flip a ReLU / max-pool choice)")
    p.add_argument("--cross-domain", choices=["resize", "paste"], default="resize",
                   help="how to bring images of another size/channel count into the model's format")
    p.set_defaults(func=_cmd_score)

    for module in ("data", "zoo", "bench"):
        try:
            mod = __import__(f"uvood.{module}.cli", fromlist=["register"])
        except ImportError:
            continue
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except UvoodError as e:
        print(f"uvood: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
