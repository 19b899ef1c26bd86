"""``uvood data list | verify [NAME] | download NAME``.

``register(subparsers)`` adds the ``data`` command to an ``argparse`` sub-parser set; each
leaf parser sets ``func(args) -> int`` (exit status). ``download`` fetches only official
files (SVHN, CIFAR-10 python batches) from their publishers, explicitly, and checks their
published md5 before anything is kept; it is never used by the tests.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import urllib.request
from pathlib import Path

from ..errors import UvoodError
from . import datasets

OFFICIAL = {  # name -> [(url, file name, md5 published with the data set)]
    "svhn": [("http://ufldl.stanford.edu/housenumbers/train_32x32.mat", "train_32x32.mat",
              "e26dedcc434d2e4c54c9b2d4a06d8373"),
             ("http://ufldl.stanford.edu/housenumbers/test_32x32.mat", "test_32x32.mat",
              "eb5a983be6a315427106f1b164d9cef3")],
    "cifar10-official": [("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "cifar-10-python.tar.gz",
                          "c58f30108f718f92721af3b95e74349a")],
}


def register(subparsers) -> None:
    """Add ``data list|verify|download`` to ``subparsers`` (from ``parser.add_subparsers()``)."""
    parser = subparsers.add_parser("data", help="list, verify or download data sets")
    sub = parser.add_subparsers(dest="data_command", required=True)
    p = sub.add_parser("list", help="named data sets, their splits and whether their files are present")
    p.add_argument("--data-dir", default=None, help="data folder (default: $UVOOD_DATA)")
    p.set_defaults(func=cmd_list)
    p = sub.add_parser("verify", help="check the sha256 of the data files")
    p.add_argument("name", nargs="?", default=None, help="one data set (default: all present)")
    p.add_argument("--data-dir", default=None)
    p.set_defaults(func=cmd_verify)
    p = sub.add_parser("download", help=f"download official files ({', '.join(OFFICIAL)}), md5-checked")
    p.add_argument("name", choices=sorted(OFFICIAL))
    p.add_argument("--data-dir", default=None)
    p.set_defaults(func=cmd_download)


def _present(ds: datasets.DatasetInfo, folder: Path) -> dict[str, bool]:
    return {split: (folder / f).exists() for split, f in ds.files.items()}


def cmd_list(args) -> int:
    folder = Path(args.data_dir or os.environ.get("UVOOD_DATA") or ".")
    print(f"data folder: {folder}")
    for name in datasets.list_datasets():
        ds = datasets.DATASETS[name]
        splits = ", ".join(f"{s}{'' if ok else ' (missing)'}" for s, ok in _present(ds, folder).items())
        print(f"  {name:17s} {ds.display:45s} {ds.num_classes:4d} classes  splits: {splits}")
    return 0


def cmd_verify(args) -> int:
    folder = datasets.data_dir(args.data_dir)
    names = [args.name] if args.name else datasets.list_datasets()
    failed = 0
    for name in names:
        ds = datasets.info(name)
        for split, present in _present(ds, folder).items():
            if not present and not args.name:
                continue
            try:
                _, sha = datasets.locate(name, split, folder)
                print(f"ok       {name}/{split}  sha256 {sha[:16]}")
            except UvoodError as exc:
                failed += 1
                print(f"FAILED   {name}/{split}: {exc}")
    return 1 if failed else 0


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download(name: str, data_dir=None) -> list[Path]:
    """Download the official files of ``name`` into the data folder, md5-checked (atomic)."""
    folder = datasets.data_dir(data_dir)
    folder.mkdir(parents=True, exist_ok=True)
    done = []
    for url, file, md5 in OFFICIAL[name]:
        target = folder / file
        if not (target.is_file() and _md5(target) == md5):
            tmp = target.with_name(target.name + ".part")
            print(f"downloading {url} -> {target}")
            try:
                urllib.request.urlretrieve(url, tmp)  # noqa: S310 (explicit user command, fixed https/http URL)
            except OSError as e:  # URLError (no network, DNS), HTTP errors, a full disk
                tmp.unlink(missing_ok=True)
                reason = getattr(e, "reason", None) or e.strerror or e
                raise UvoodError(f"Cannot download {url} ({reason}); nothing was kept. Check the network and retry, "
                                 f"or fetch the file by hand and place it at {target}.") from None
            got = _md5(tmp)
            if got != md5:
                tmp.unlink()
                raise UvoodError(f"{url}: md5 {got} differs from the published {md5}; nothing was kept. Retry later "
                                 "or fetch the file by hand and place it at " + str(target))
            os.replace(tmp, target)
        if file.endswith(".tar.gz"):
            with tarfile.open(target) as archive:
                archive.extractall(folder, filter="data")
        done.append(target)
    return done


def cmd_download(args) -> int:
    for path in download(args.name, args.data_dir):
        print(f"ok  {path}")
    return 0
