"""``uvood zoo list | train NAME [--epochs --seed --data-dir] | eval NAME``.

``register(subparsers)`` adds the ``zoo`` command; each leaf parser sets
``func(args) -> int``. ``train`` resumes from ``<out-dir>/<NAME>/last.pt`` when it exists
and writes ``<out-dir>/<NAME>/<NAME>.pt`` and ``.json``; copy them into
``uvood/zoo/checkpoints/`` to ship them.
"""

from __future__ import annotations

import json

from . import evaluate, info, list_models


def register(subparsers) -> None:
    """Add ``zoo list|train|eval`` to ``subparsers`` (from ``parser.add_subparsers()``)."""
    parser = subparsers.add_parser("zoo", help="list, train or evaluate zoo models")
    sub = parser.add_subparsers(dest="zoo_command", required=True)
    p = sub.add_parser("list", help="shipped and trainable models")
    p.set_defaults(func=cmd_list)
    from ..cli import add_device_option, positive_int

    p = sub.add_parser("train", help="train a zoo model (seeded, resumable)")
    p.add_argument("name", choices=list_models(trainable=True))
    p.add_argument("--epochs", type=positive_int, default=None, help="default: the model's recipe")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None, help="data folder (default: $UVOOD_DATA)")
    p.add_argument("--out-dir", default="runs", help="checkpoints and logs (default: runs)")
    p.add_argument("--c", type=positive_int, default=None, help="CNN width c (default: the model's)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")

    add_device_option(p, precision=False)
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("eval", help="test accuracy of a shipped model")
    p.add_argument("name")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--limit", type=positive_int, default=None, help="evenly spaced subset of the test split")
    add_device_option(p)
    p.set_defaults(func=cmd_eval)


def cmd_list(args) -> int:
    for name in list_models():
        meta = info(name)
        acc = meta.get("test_accuracy")
        extra = " CPU fallback (c={})".format(meta.get("c")) if meta.get("cpu_fallback") else ""
        score = "" if acc is None else f"test acc {100 * acc:.2f} %"
        if "imagenet1k_sample" in meta:
            photos = meta["imagenet1k_sample"]
            score = (f"ImageNet photos top-1 {100 * photos['top1']:.1f} %, top-5 {100 * photos['top5']:.1f} % "
                     f"(n = {photos['n']}, split unknown)")
        elif "tinyimagenet_val" in meta:
            tiny = meta["tinyimagenet_val"]
            score = f"Tiny-ImageNet val top-1 {100 * tiny['top1']:.2f} %, top-5 {100 * tiny['top5']:.2f} %"
        print(f"  {name:20s} {meta.get('architecture', ''):20s} {score}{extra}")
    shipped = set(list_models())
    for name in list_models(trainable=True):
        if name not in shipped:
            print(f"  {name:20s} trainable only: uvood zoo train {name}")
    return 0


def cmd_train(args) -> int:
    from .train import train

    overrides = {"c": args.c} if args.c else {}
    from ..devices import default_device

    meta = train(args.name, epochs=args.epochs, seed=args.seed, data_dir=args.data_dir, out_dir=args.out_dir,
                 threads=args.threads, device=default_device() if args.device else None, **overrides)
    print(json.dumps({k: meta[k] for k in ("name", "test_accuracy", "wall_time_s", "device", "weights_sha256")}))
    return 0


def cmd_eval(args) -> int:
    result = evaluate(args.name, data_dir=args.data_dir, limit=args.limit)
    if result.get("cpu_fallback"):
        result["note"] = f"CPU fallback model (c={result.get('c')}), not the paper's c=128"
    print(json.dumps(result))
    return 0
