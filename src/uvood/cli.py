"""The ``uvood`` command line: one entry point, subcommands per stage of the pipeline.

    uvood demo                      offline demo on the bundled MNIST / Fashion-MNIST sample
    uvood scores                    the registry of score names
    uvood score --model M --data D --score SPEC --out scores.csv
                                    (M: a zoo name, or package.module:factory with --weights FILE)
    uvood data ... / uvood zoo ... / uvood bench ...
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

from .errors import UvoodError

KINDS = {"output": "V terms (output)", "encoding": "U terms (encoding)", "gradient": "gradient scores",
         "fitted": "feature statistics, fitted on ID data (uvood score --fit ID.npz, or Detector.fit)",
         "shaping": "activation / weight shaping, then a score: SHAPER>SPEC (fitted on ID data)",
         "perturbation": "input perturbation (needs the model and its inputs)"}


def positive_int(text: str) -> int:
    """argparse type of a count (images, epochs, threads, a batch size): an integer >= 1. A 0 would otherwise
    read as "not given" in ``n or default`` and silently run the default."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number; give an integer >= 1.") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a count; give an integer >= 1.")
    return value


def _cmd_scores(args) -> int:
    from .scores.registry import entries

    by_kind: dict[str, list] = {}
    for e in entries().values():
        by_kind.setdefault(e.kind, []).append(e)
    for kind in [*KINDS, *sorted(set(by_kind) - set(KINDS))]:  # a kind not listed above is shown too
        if kind not in by_kind:
            continue
        print(f"{KINDS.get(kind, kind)}:")
        for e in sorted(by_kind[kind], key=lambda e: e.name):
            params = ", ".join(k if k in e.positional else f"{k}={v}" for k, v in e.params.items())
            first = (e.doc or "").strip().splitlines()[0] if e.doc else ""
            print(f"  {e.name + ('(' + params + ')' if params else ''):<60} {first}")
    print("\nCombine terms with '*', e.g. norm(0.3)*energy, norm(inf)*tv; shape first with '>', e.g. "
          "react(90)>norm(1)*energy.")
    return 0


def _load_model(args):
    """``--model`` (a zoo name or a ``module:factory``) with ``--weights`` -> (model, its input C, H, W)."""
    from . import zoo
    from .user_model import FORMS, is_factory_name, load_user_model, load_weights

    name = args.model
    if is_factory_name(name):
        if not args.input_shape:
            raise UvoodError(f"--model {name} is your own model: give its input as --input-shape C,H,W "
                             "(e.g. 3,32,32); the images are brought to that format.")
        from .devices import default_device

        return load_user_model(name, args.weights).to(default_device()), args.input_shape
    if name.endswith((".pt", ".pth", ".ckpt", ".bin", ".safetensors")) or Path(name).is_file():
        raise UvoodError(f"--model {name} looks like a weights file: give the code that builds the model as "
                         f"--model {FORMS} and the file as --weights {name}.")
    model = zoo.load(name)
    shape = tuple(zoo.info(name)["input"])
    if getattr(args, "input_shape", None) and tuple(args.input_shape) != shape:
        raise UvoodError(f"--input-shape {','.join(map(str, args.input_shape))} does not match zoo model {name}, "
                         f"which takes {','.join(map(str, shape))}; drop --input-shape (it is for your own "
                         "module:factory model): the images are brought to the model's format.")
    if args.weights:
        load_weights(model, args.weights)
    return model.eval(), shape


def _input_shape(text: str) -> tuple[int, int, int]:
    """argparse type of --input-shape: 'C,H,W' with C in (1, 3) and H = W."""
    try:
        c, h, w = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected C,H,W such as 3,32,32, got {text!r}") from None
    if c not in (1, 3) or h != w or h < 1:
        raise argparse.ArgumentTypeError(f"expected 1 or 3 channels and square images (H = W), got {text!r}")
    return c, h, w


def check_out(path, folder: bool = False) -> Path:
    """Fail before any work when the output ``path`` (a file, or a ``folder``) cannot be written."""
    path = Path(path)
    for parent in ([path] if folder else []) + list(path.parents):
        if parent.exists():
            if not parent.is_dir():
                raise UvoodError(f"Cannot write to {path}: {parent} is a file, not a folder. Choose another --out.")
            if not os.access(parent, os.W_OK):
                raise UvoodError(f"Cannot write to {path}: no permission to write in {parent}. Choose another --out.")
            break
    if not folder and path.is_dir():
        raise UvoodError(f"Cannot write to {path}: it is a folder. Give a file name, e.g. --out {path / 'scores.csv'}.")
    return path


def _read_user_images(path: Path):
    """(images, labels or None, names) from an .npz in either format or a folder of images."""
    import numpy as np

    from .data import formats, lazy

    if not path.exists():
        raise UvoodError(f"No data at {path}: pass an .npz file (decoded or JPEG format) or a folder of images.")
    if path.is_dir():  # files listed now, each decoded when its batch is scored
        files, labels, classes = formats.list_image_folder(path)
        y = np.asarray(labels, np.int64)
        images = lazy.Decoded(lambda i: formats.read_image_file(files[i]), len(files))
        return images, y, [f"{classes[c]}/{i}" for i, c in enumerate(y)]
    arrays = lazy.open_npz(path)  # uncompressed members are read slice by slice, when scored
    if {"data", "offsets"} <= set(arrays):  # JPEG bytes held, each image decoded when its batch is scored
        archive = formats.JpegArchive(path, num_classes=2**31 - 1, allow_unlabelled=True)
        return lazy.Decoded(archive.__getitem__, len(archive)), archive.y, [str(n) for n in archive.names]
    if "x" not in arrays:
        raise UvoodError(f"{path} has keys {sorted(arrays)}: expected 'x' (and 'y') for decoded images, or "
                         "'data', 'offsets', 'y', 'names' for JPEG bytes (see the data README).")
    x = arrays["x"]  # any layout of uvood.validation.LAYOUT_RULE; checked by transforms.to_model_format
    y = arrays.get("y")
    return x, (None if y is None else np.asarray(y)), None


def _load_inputs(path: str, shape: tuple[int, int, int], args):
    """DATA in the model's input format ``shape`` = (C, H, W): the images (of an .npz, a JPEG archive or a
    folder) are read, decoded and converted batch by batch as they are scored
    (:class:`uvood.data.lazy.LazyImages`), so memory does not grow with their number."""
    from .data import transforms
    from .data.lazy import LazyImages

    images, y, names = _read_user_images(Path(path))
    c, h, _ = shape
    return LazyImages(images, lambda part: transforms.to_model_format(part, channels=c, size=h,
                                                                      mode=args.cross_domain)), y, names


def _cmd_score(args) -> int:
    import torch

    from .api import score_features, score_model
    from .batching import data_length
    from .distributed import dist, is_writer, map_batches
    from .features import extract, model_fingerprint
    from .model import eval_mode
    from .progress import bar
    from .scores.registry import get_score

    specs = args.score or ["norm(0.3)*energy"]
    scores = [get_score(s) for s in specs]
    to_fit = [sc for sc in scores if sc.needs_fit]
    if to_fit and not args.fit:
        raise UvoodError(f"Score {to_fit[0].spec!r} must first be fitted on ID training data: add --fit ID.npz "
                         "(labelled images of the model's classes, same formats as --data).")
    if args.fit and not to_fit:
        print(f"note: --fit {args.fit} is not used: none of the scores needs fitting.", file=sys.stderr)
    out = check_out(args.out)
    model, shape = _load_model(args)
    if to_fit:
        x_fit, y_fit, _ = _load_inputs(args.fit, shape, args)
        if hasattr(x_fit, "slice"):  # lazily read images: the fit reads them whole (its statistics need all of them)
            x_fit = x_fit.slice(0, len(x_fit))
        for sc in to_fit:  # one forward pass over the ID data per score, in batches
            sc.fit(model, x_fit, None if y_fit is None else torch.as_tensor(y_fit), seed=0)
        print(f"fitted {', '.join(sc.spec for sc in to_fit)} on {len(x_fit)} ID images from {args.fit}",
              file=sys.stderr)
    x, y, names = _load_inputs(args.data, shape, args)

    with_model = [sc for sc in scores if sc.needs_model]

    def one_batch(xb, _y):  # one batch: the prediction and every score; nothing else is kept
        feats = extract(model, xb, batch_size=args.batch_size, progress=False, dtype=args.dtype)
        cols = {"prediction": feats.logits.argmax(1).numpy()}
        # every score that needs the model in one call: the deep gradient scores share ONE fused deep pass
        deep = score_model(with_model, model, xb, batch_size=args.batch_size, progress=False,
                           dtype=args.dtype) if with_model else {}
        for i, sc in enumerate(scores):
            cols[f"s{i}"] = (deep[sc.spec] if sc.needs_model else score_features(sc, feats.h, feats.logits)).numpy()
        return cols

    pbar = bar(data_length(x), "score", True)
    try:
        with eval_mode(model):
            cols = map_batches(one_batch, x, args.batch_size, "uvood score",
                               fingerprint=model_fingerprint(model) if dist() else "", progress=pbar.update)
    finally:
        pbar.close()
    if not cols:
        raise UvoodError("The data is empty: nothing to score. Pass at least one sample.")
    if not is_writer():  # under torchrun every rank holds every row; rank 0 writes them
        return 0
    n = len(cols["prediction"])

    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "name", "label", "prediction", *(sc.spec for sc in scores)])
        for i in range(n):
            label = "" if y is None or int(y[i]) < 0 else int(y[i])
            w.writerow([i, names[i] if names is not None else i, label, int(cols["prediction"][i]),
                        *(repr(float(cols[f"s{k}"][i])) for k in range(len(scores)))])
    print(f"wrote {n} rows x {len(scores)} score(s) to {out}")
    return 0


def _cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(verbose=True)


def add_device_option(p, precision: bool = True) -> None:
    """``--device`` (checked before any work, :func:`uvood.devices.use`) and ``--precision``
    (:mod:`uvood.precision`; not on ``zoo train``, whose recipes choose theirs) of every command that runs a model."""
    p.add_argument("--device", default=None, metavar="DEVICE",
                   help="where the model runs: cpu (default), cuda, cuda:N or mps; under torchrun, cuda means one "
                   "GPU per rank (cuda:LOCAL_RANK)")
    if precision:
        p.add_argument("--precision", choices=["float32", "bfloat16"], default=None,
                       help="float32 (default) or bfloat16: autocast of the forward passes that give features and "
                       "logits; the scores that backpropagate through the model stay float32")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="uvood", description="Post-hoc OOD detection for PyTorch classifiers "
                                     "(gradient scores, encoding-output scores, metrics, benchmarks).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("demo", help="offline demo: the zoo's MNIST model on bundled MNIST / Fashion-MNIST images")
    add_device_option(p)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("scores", help="list the registry of score names")
    p.set_defaults(func=_cmd_scores)

    p = sub.add_parser("score", help="score inputs with a model and write one CSV row per input",
                       description="Score images with a zoo model or your own and write one CSV row per image.",
                       epilog="Your own model: --model mypkg.nets:build --weights net.pt --input-shape 3,32,32, "
                       "where build() returns the nn.Module and net.pt holds torch.save(model.state_dict(), "
                       "'net.pt'); the weights are read with torch.load(weights_only=True), no other object is "
                       "ever unpickled. Importing mypkg.nets runs its code: name only modules you trust.")
    p.add_argument("--model", required=True, help="a zoo name (uvood zoo list), or your own model as "
                   "package.module:factory or path/to/file.py:factory (a function returning the nn.Module)")
    p.add_argument("--weights", help="weights for the model: a state dict saved with torch.save(model.state_dict(), "
                   "FILE), loaded with torch.load(weights_only=True)")
    p.add_argument("--input-shape", type=_input_shape, metavar="C,H,W",
                   help="input format of your own model (with --model module:factory), e.g. 3,32,32")
    p.add_argument("--data", required=True,
                   help="an .npz with 'x' (and optional 'y'), a JPEG-format .npz, or a folder of images. 'x' may be "
                   "N x H x W (greyscale), N x H x W x C or N x C x H x W (C = 1 or 3; a 4-D array is N x C x H x W "
                   "when its second axis is 1 or 3), uint8 (0..255) or float in [0, 1]")
    p.add_argument("--score", action="append", help="a score spec (repeatable), e.g. 'norm(0.3)*energy'")
    p.add_argument("--fit", metavar="ID_DATA", help="ID training data (labelled .npz or image folder) on which "
                   "to fit the scores that need it (mahalanobis, knn, vim, react(90)>energy, batchgrad, ...)")
    p.add_argument("--out", default="scores.csv", help="output CSV path")
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--dtype", choices=["float32", "float64"], default=None,
                   help="run the model in this dtype (default: its own); float64 makes deep gradient scores of an "
                   "image independent of the batch it is in (float32 rounding can flip a ReLU / max-pool choice)")
    p.add_argument("--cross-domain", choices=["resize", "paste"], default="resize",
                   help="how to bring images of another size/channel count into the model's format")
    add_device_option(p)
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
    from . import devices, distributed, precision

    before = devices.default_device()
    try:
        precision.use(getattr(args, "precision", None))
        device = distributed.local_device(getattr(args, "device", None))
        if device is not None:
            devices.use(device)  # the models the command loads go there (an unavailable device: an error now)
        distributed.init_from_env(device)  # under torchrun: join the other ranks
        try:
            return int(args.func(args) or 0)
        finally:
            distributed.close()
            precision.use(None)  # back to float32 and the device before, for whatever runs next in this process
            devices.restore(before)
    except UvoodError as e:
        return _fail(str(e))
    except OSError as e:  # a file or folder the command reads or writes, a network error
        where = f"{e.filename}: " if e.filename else ""
        return _fail(f"{where}{e.strerror or e}. Check the path, its permissions and the free space.")
    except KeyboardInterrupt:
        print("uvood: interrupted", file=sys.stderr)
        return 130


def console() -> int:
    """The ``uvood`` command (and ``python -m uvood``): :func:`main`, with the garbage collector told to leave the
    objects alive at start and at exit alone (``gc.freeze``). Exit then no longer walks the hundreds of thousands of
    objects torch's import created: about 0.5 s of every command. Not in :func:`main`, which tests and programs
    call in-process, where frozen objects would never be collected."""
    import gc

    gc.freeze()  # what the imports made: never garbage, so never worth scanning in a full collection
    try:
        return main()
    finally:
        gc.freeze()


def _fail(message: str) -> int:
    """Print the error as one line (exit status 2)."""
    print(f"uvood: error: {' '.join(message.split())}", file=sys.stderr)
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(console())
