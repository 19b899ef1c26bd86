"""Build ``src/uvood/data/samples/samples.npz``: a small bundled sample of real test images
for the offline demo (300 MNIST test + 300 Fashion-MNIST test images, evenly spaced, so the
classes stay balanced), with their labels, source indices and source file sha256.

Usage: ``UVOOD_DATA=../shared/data python scripts/make_samples.py [--n 300]``
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from uvood.data import datasets

OUT = Path(__file__).resolve().parents[1] / "src" / "uvood" / "data" / "samples" / "samples.npz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    arrays = {}
    for name in datasets.SAMPLE_SETS:
        images = datasets.load(name, "test", data_dir=args.data_dir, limit=args.n)
        arrays[f"{name}_x"] = images.x
        arrays[f"{name}_y"] = images.y
        arrays[f"{name}_index"] = images.indices
        arrays[f"{name}_sha256"] = np.array(images.sha256)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {OUT} ({OUT.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
