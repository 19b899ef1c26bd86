"""EfficientNet-Lite forward pass on CPU: the default (contiguous) memory layout against
channels-last, which the zoo wrapper uses; ratios measured in one run.

    python benchmarks/efficientnet_layout.py [--threads 1] [--batch 32] [--repeats 3]

One batch of random images at each model's own resolution (224 px for Lite0, 260 px for Lite2),
forward pass only (``torch.inference_mode``), best of ``--repeats``. Also prints the largest
difference of the logits between the two layouts, relative to the largest logit (float32 rounding).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from uvood import zoo
from uvood.zoo.efficientnet import input_size


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), batch {args.batch}, best of {args.repeats}")
    print("| model | default layout ms/img | channels-last ms/img | speed-up | "
          "max abs. diff of logits / max abs. logit |")
    print("|---|---|---|---|---|")
    for name in ("efficientnet-lite0", "efficientnet-lite2"):
        fast = zoo.load(name)
        default = copy.deepcopy(fast)
        default.net.to(memory_format=torch.contiguous_format)
        default.forward = lambda x, m=default: m.net(m.normalize(x))  # the network in the default layout
        x = torch.rand(args.batch, 3, input_size(name), input_size(name))
        with torch.inference_mode():
            z_fast, z_default = fast(x), default(x)
            t_default = best(lambda m=default, x=x: m(x), args.repeats)
            t_fast = best(lambda m=fast, x=x: m(x), args.repeats)
        diff = ((z_fast - z_default).abs().max() / z_default.abs().max()).item()
        print(f"| {name} | {1e3 * t_default / args.batch:.1f} | {1e3 * t_fast / args.batch:.1f} | "
              f"{t_default / t_fast:.2f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
