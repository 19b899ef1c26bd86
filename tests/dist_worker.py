"""One rank of the distributed tests (tests/test_distributed.py starts two of these with torchrun's environment).

    python tests/dist_worker.py TASK OUT_DIR [CACHE_DIR]

Each rank saves what the run returned to OUT_DIR/TASK-rank<r>.npz, or writes OUT_DIR/rank<r>.err on a UvoodError.
"""

import os
import signal
import sys

import numpy as np
import torch
from torch import nn

import uvood
from uvood import distributed
from uvood.errors import UvoodError

SPECS = {"deep": "gradnorm(depth=deep)", "shallow": "exgrad", "batchgrad": "batchgrad(depth=deep)",
         "fitted": "mahalanobis"}


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 6, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(96, 16), nn.ReLU(),
                         nn.Linear(16, 3)).eval()


def make_data(n: int = 60) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, 10, 10, generator=g), torch.arange(n) % 3


def run(task: str, cache_dir: str | None) -> dict[str, np.ndarray]:
    """The values one process (no process group) or the group computes for ``task``."""
    rank = distributed.rank_world()[0]
    model = make_model()
    x, y = make_data()
    if task == "features":
        f = uvood.extract(model, (x, y), batch_size=8, progress=False)
        return {"h": f.h.numpy(), "logits": f.logits.numpy(), "y": f.y.numpy()}
    if task in ("cached", "kill"):
        if task == "kill" and rank == 1:  # die (SIGKILL) right after this rank's first part is saved
            from uvood import cache

            save = cache.save_verified

            def save_then_die(path, key, arrays, any_rank=False):
                save(path, key, arrays, any_rank)
                if ".part-" in str(path):
                    os.kill(os.getpid(), signal.SIGKILL)

            cache.save_verified = save_then_die  # map_batches imports it from uvood.cache when called
        calls = []
        model[0].register_forward_hook(lambda m, i, o: calls.append(o.shape[0]))
        f = uvood.extract(model, (x, y), batch_size=4, progress=False, cache_dir=cache_dir, data_id="toy")
        return {"h": f.h.numpy(), "logits": f.logits.numpy(), "computed": np.array(sum(calls))}
    if task == "bench":  # a tiny spec's deep rows: the fused deep pass and a product with a deep factor
        return bench(cache_dir)
    if task == "fscores":  # a feature-score cache that rank 0 has whole and rank 1 lacks (a file written between
        return fscores(cache_dir, rank)  # the ranks' lookups): both must fit, extracting together, or neither
    if task == "scores":  # features, shallow and deep gradient scores, BatchGrad and a fitted score in one run
        f = uvood.extract(model, (x, y), batch_size=8, progress=False)
        out = {"h": f.h.numpy(), "logits": f.logits.numpy(), "y": f.y.numpy()}
        out |= {k: uvood.score_model(SPECS[k], model, x, batch_size=8, progress=False).numpy()
                for k in ("deep", "shallow")}
        for k in ("batchgrad", "fitted"):
            det = uvood.Detector(model, score=SPECS[k], batch_size=8).fit((x, y), progress=False)
            out[k] = det.score(x, progress=False).numpy()
            out[k + "_threshold"] = np.array(det.threshold)
        return out
    raise ValueError(task)


BENCH_SCORES = ["gradnorm(depth=deep)", "exgrad(depth=deep)", "grad(agg=mean_of_norm,depth=deep)",
                "gradnorm(depth=deep)*energy", "energy"]


def bench(cache_dir: str) -> dict[str, np.ndarray]:
    """``uvood.bench.runner.run`` of a tiny spec (mnist-mlp, MNIST vs Fashion-MNIST, 200 images each: two chunks of
    the fused pass per set; real data in $UVOOD_DATA) with :data:`BENCH_SCORES`; every score array, and the number
    of images this rank pushed through the deep passes (the fused pass and the product's score_model)."""
    from pathlib import Path

    from test_bench import _mini_spec
    from uvood.bench import runner
    from uvood.scores import fused

    seen = [0]
    deep_pass = fused.deep_pass

    def counted(model, x, *a, **k):
        seen[0] += x.shape[0]
        return deep_pass(model, x, *a, **k)

    fused.deep_pass = counted
    score_model = runner.score_model

    def counted_score_model(spec, model, x, *a, **k):
        seen[0] += x.shape[0]
        return score_model(spec, model, x, *a, **k)

    runner.score_model = counted_score_model
    spec_dir = Path(cache_dir) / f"spec-rank{os.environ.get('RANK', '-')}"
    spec_dir.mkdir(exist_ok=True)
    spec = _mini_spec(spec_dir, pairs=[["MNIST", "Fashion-MNIST"]], quick_n=200, quick_deep_n=200)
    try:
        result = runner.run(spec, scores=BENCH_SCORES, quick=True, data_dir=os.environ["UVOOD_DATA"],
                            cache_dir=Path(cache_dir) / "cache", progress=False, log=lambda *a: 0, n_boot=20)
    finally:  # the reference runs in the test's own process
        fused.deep_pass, runner.score_model = deep_pass, score_model
    out = {"|".join(k): v for k, v in result.scores.items()}
    out["auroc"] = np.array([r["auroc"] for r in result.rows])
    out["deep_images"] = np.array(seen[0])
    return out


def fscores(cache_dir: str, rank: int) -> dict[str, np.ndarray]:
    """``runner._feature_scores`` of a fitted score whose fit extracts the training features (a collective), where
    rank 0 finds every value cached and rank 1 finds none (each reads its own file, as after a file appeared
    between two lookups). ``fit_images``: the images this rank pushed through the model for the fit."""
    from pathlib import Path

    from uvood.bench import runner
    from uvood.cache import save_verified
    from uvood.scores.fitted import head_weights

    model = make_model()
    x, y = make_data()
    f = uvood.extract(model, (x, y), batch_size=8, progress=False)
    score = uvood.get_score("mahalanobis")
    pushed = []

    def training_features():
        hook = model[0].register_forward_hook(lambda m, i, o: pushed.append(o.shape[0]))
        try:
            return uvood.extract(model, (x, y), batch_size=8, progress=False, cache_dir=cache_dir, data_id="train")
        finally:
            hook.remove()

    fit = runner.FitOnFeatures(score, "toy-training-features", training_features,
                               lambda: head_weights(model, x[:1]))
    path = Path(cache_dir) / f"fscores-rank{rank}.npz"
    if rank == 0:
        save_verified(path, "k", {runner._score_key(score, fit): np.zeros(len(x))})
    values = runner._feature_scores([score], f, "k", path, {score: fit})
    return {"values": values[runner._score_key(score, fit)], "fit_images": np.array(sum(pushed))}


def errors() -> dict[str, np.ndarray]:
    """Each bad input in turn, in one process group (a refused call leaves the group usable): the error of each."""
    rank = distributed.rank_world()[0]
    x, y = make_data()
    out = {}
    scenarios = {"mismatch": lambda: uvood.extract(make_model(rank), x, batch_size=8, progress=False),
                 "tiny": lambda: uvood.extract(make_model(), x[:1], batch_size=8, progress=False),
                 "raise": lambda: uvood.extract(broken if rank == 1 else make_model(), x, batch_size=8, progress=False),
                 "version": lambda: uvood.extract(make_model(), x, batch_size=8, progress=False)}
    broken = make_model()
    broken[0].register_forward_hook(lambda *a: (_ for _ in ()).throw(RuntimeError("rank 1's model broke")))
    for name, call in scenarios.items():
        if name == "version" and rank == 1:
            uvood.__version__ = "9.9.9"  # as if rank 1 ran another installation
        try:
            call()
            out[name] = np.array("no error")
        except UvoodError as e:
            out[name] = np.array(str(e))
    return out


def main() -> int:
    task, out = sys.argv[1], sys.argv[2]
    cache_dir = sys.argv[3] if len(sys.argv) > 3 else None
    torch.set_num_threads(1)
    try:
        distributed.init_from_env()
        values = errors() if task == "errors" else run(task, cache_dir)
    except UvoodError as e:
        rank = os.environ.get("RANK", "0")
        with open(os.path.join(out, f"rank{rank}.err"), "w") as f:
            f.write(str(e))
        return 2
    finally:
        distributed.close()
    np.savez(os.path.join(out, f"{task}-rank{os.environ.get('RANK', '0')}.npz"), **values)
    return 0


if __name__ == "__main__":
    sys.exit(main())
