"""Seeded, resumable training of the zoo models on CPU (or CUDA when present).

Recipe per model (:data:`RECIPES`): SGD with Nesterov momentum 0.9, weight decay, a
one-cycle learning-rate schedule stepped per batch, cross-entropy without label smoothing
(softmax confidences matter to the OOD scores). CNNs train under bfloat16 autocast (about 2x
faster on CPUs with AVX512-BF16); evaluation and the saved weights are float32.
Augmentation: random crop from a zero-padded image (``pad`` px each side) and, where it
suits the data, horizontal flip. Data are held as one uint8 N x H x W x C tensor; a batch
is plain indexing, no DataLoader.

Determinism and resuming: epoch ``e`` uses ``torch.Generator().manual_seed(seed * 1000 + e)``
for shuffling and augmentation and ``torch.manual_seed(seed * 1000 + e)`` for dropout, so a
run killed after epoch ``e`` and resumed gives the same result as an uninterrupted run (up to
non-deterministic kernels). A checkpoint (model, optimizer, scheduler, epoch, elapsed wall
time) is written after every epoch atomically (temp file + ``os.replace``) to
``<out_dir>/<name>/last.pt``; the final weights go to ``<name>.pt`` and metadata to
``<name>.json`` next to it.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..cache import atomic_write
from ..errors import UvoodError
from .architectures import SPECS, build

RECIPES: dict[str, dict] = {
    "mnist-mlp": {"epochs": 40, "batch": 128, "lr": 0.1, "wd": 1e-4, "pad": 2, "flip": False},
    "fashionmnist-cnn": {"epochs": 12, "batch": 128, "lr": 0.1, "wd": 5e-4, "pad": 2, "flip": True, "bf16": True},
    "svhn-cnn": {"epochs": 15, "batch": 128, "lr": 0.05, "wd": 5e-4, "pad": 2, "flip": False, "bf16": True},
    "cifar10-cnn": {"epochs": 30, "batch": 128, "lr": 0.1, "wd": 5e-4, "pad": 4, "flip": True, "bf16": True},
}


PAPER_C = {"cifar10-cnn": 128, "fashionmnist-cnn": 32, "svhn-cnn": 32}  # the paper's CNN widths


def is_cpu_fallback(name: str, c: int | None) -> bool:
    """True when a CNN is narrower than the paper's (CIFAR-10 at c < 128 trained on a CPU)."""
    return bool(name in PAPER_C and c is not None and c < PAPER_C[name])


def weights_sha256(state: dict) -> str:
    """sha256 over the state dict's tensors (names and raw bytes, in key order)."""
    digest = hashlib.sha256()
    for key, value in state.items():
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _atomic_save(obj, path: Path) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def augment(x: torch.Tensor, pad: int, flip: bool, gen: torch.Generator) -> torch.Tensor:
    """Random crop of a ``pad``-px zero-padded uint8 N x H x W x C batch, plus optional h-flip."""
    n, h, w, _ = x.shape
    if pad:
        xp = F.pad(x, (0, 0, pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
        rows = (dy[:, None] + torch.arange(h))[:, :, None]
        cols = (dx[:, None] + torch.arange(w))[:, None, :]
        x = xp[torch.arange(n)[:, None, None], rows, cols]
    if flip:
        mask = torch.rand(n, generator=gen) < 0.5
        x = torch.where(mask[:, None, None, None], x.flip(2), x)
    return x


def to_input(x_uint8_nhwc: torch.Tensor) -> torch.Tensor:
    """uint8 N x H x W x C -> float N x C x H x W in [0, 1] (channels-last memory)."""
    return x_uint8_nhwc.permute(0, 3, 1, 2).float().div_(255.0)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> float:
    """Top-1 accuracy (fraction) of ``model`` on uint8 NHWC images ``x`` and labels ``y``."""
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(x), batch):
        correct += int((model(to_input(x[i:i + batch])).argmax(1) == y[i:i + batch]).sum())
    model.train(was_training)
    return correct / max(len(x), 1)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, x: torch.Tensor, batch: int = 500) -> bool:
    """Re-estimate BatchNorm running statistics with dropout switched off.

    Dropout placed *before* a BatchNorm (conv -> BN -> ReLU -> dropout -> conv -> BN ...)
    makes the statistics seen in training (dropped, rescaled by 1/(1-p)) differ from those at
    test time ("variance shift", Li et al., CVPR 2019); on Fashion-MNIST the c = 32 model lost
    about 8 points of test accuracy to it. Forwarding un-augmented training images ``x`` (uint8
    NHWC) in train mode with dropout p = 0 and ``momentum=None`` (a cumulative average) gives
    the exact statistics of the test-time network. Weights are unchanged. Returns whether the
    model had both dropout and BatchNorm (otherwise nothing is done).
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    drops = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    if not norms or not drops:
        return False
    was_training, momenta, rates = model.training, [m.momentum for m in norms], [m.p for m in drops]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    for m in drops:
        m.p = 0.0
    model.train()
    for i in range(0, len(x), batch):
        model(to_input(x[i:i + batch]))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    for m, rate in zip(drops, rates):
        m.p = rate
    model.train(was_training)
    return True


RECALIBRATION_IMAGES = 10000


def _recalibration_images(x_train: torch.Tensor) -> torch.Tensor:
    n = min(RECALIBRATION_IMAGES, len(x_train))
    return x_train[torch.from_numpy(np.round(np.linspace(0, len(x_train) - 1, n)).astype(np.int64))]


def _arrays(dataset: str, split: str, data_dir, cache_dir: Path):
    """(uint8 NHWC tensor, int64 labels, file sha256, file path) of a named data set split."""
    from ..data import datasets

    images = datasets.load(dataset, split, data_dir=data_dir, cache_dir=cache_dir)
    if not isinstance(images.x, np.ndarray):
        raise UvoodError(f"{dataset} has variable-size images; the zoo trains on fixed-size data sets only.")
    return (torch.from_numpy(np.ascontiguousarray(images.x)), torch.from_numpy(images.y.astype(np.int64)),
            images.sha256, images.path)


def train(name: str, epochs: int | None = None, seed: int = 0, data_dir=None, out_dir="runs",
          threads: int | None = None, progress: bool = True, device=None, **overrides) -> dict:
    """Train zoo model ``name``, resuming from ``<out_dir>/<name>/last.pt``; returns its metadata.

    ``overrides`` replace architecture kwargs (e.g. ``c=48``); they are part of the run's
    identity, so a checkpoint made with other settings is not resumed (an error says so).
    """
    from tqdm import tqdm

    if name not in RECIPES:
        raise UvoodError(f"zoo model {name!r} is not trainable; trainable: {sorted(RECIPES)}.")
    if threads:
        torch.set_num_threads(threads)
    recipe = dict(RECIPES[name])
    epochs = int(epochs or recipe["epochs"])
    spec = SPECS[name]
    run_dir = Path(out_dir) / name
    run_dir.mkdir(parents=True, exist_ok=True)
    from ..devices import parse_device

    # --device (checked: an unavailable one is an error); by default the first GPU when there is one
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = parse_device(device) if device is not None else torch.device(auto)

    x_train, y_train, train_sha, _ = _arrays(spec["dataset"], "train", data_dir, run_dir.parent)
    x_test, y_test, test_sha, _ = _arrays(spec["dataset"], "test", data_dir, run_dir.parent)
    x_train = x_train.to(device)
    subset = torch.from_numpy(np.round(np.linspace(0, len(y_test) - 1, min(2000, len(y_test)))).astype(np.int64))
    config = {"name": name, "seed": seed, "epochs": epochs, "recipe": recipe,
              "kwargs": {**spec["kwargs"], **overrides}, "train_sha256": train_sha}

    torch.manual_seed(seed)
    model = build(name, **overrides).to(device)
    if spec["arch"] != "MLP":
        model = model.to(memory_format=torch.channels_last)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": recipe["wd"]}, {"params": no_decay}],
                          lr=recipe["lr"], momentum=0.9, nesterov=True)
    steps = (len(x_train) + recipe["batch"] - 1) // recipe["batch"]
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe["lr"], epochs=epochs, steps_per_epoch=steps,
                                                pct_start=0.25)
    start, elapsed, history = 0, 0.0, []
    last = run_dir / "last.pt"
    if last.exists():
        state = torch.load(last, map_location=device, weights_only=True)
        if state["config"] != config:
            raise UvoodError(f"{last} was made with other settings ({state['config']}); delete it or "
                             "train with the same --epochs/--seed to resume.")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        start, elapsed, history = state["epoch"], state["elapsed"], state["history"]
        print(f"resuming {name} after epoch {start}/{epochs}", flush=True)

    for epoch in range(start, epochs):
        t0 = time.time()
        gen = torch.Generator().manual_seed(seed * 1000 + epoch)
        torch.manual_seed(seed * 1000 + epoch)
        order = torch.randperm(len(x_train), generator=gen)
        model.train()
        correct = seen = 0
        loss_sum = 0.0
        bar = tqdm(range(steps), desc=f"{name} {epoch + 1}/{epochs}", disable=not progress,
                   mininterval=1.0 if os.isatty(2) else 30.0)
        for step in bar:
            idx = order[step * recipe["batch"]:(step + 1) * recipe["batch"]]
            xb = to_input(augment(x_train[idx], recipe["pad"], recipe["flip"], gen)).to(device)
            yb = y_train[idx].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(recipe.get("bf16"))):
                logits = model(xb).float()
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            correct += int((logits.argmax(1) == yb).sum())
            seen += len(yb)
            loss_sum += float(loss.detach()) * len(yb)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.4f}", refresh=False)
        bar.close()
        elapsed += time.time() - t0
        sub = accuracy(model, x_test[subset], y_test[subset])
        history.append({"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_acc": correct / seen,
                        "test2000_acc": sub, "seconds": time.time() - t0})
        print(json.dumps(history[-1]), flush=True)
        _atomic_save({"config": config, "model": model.state_dict(), "opt": opt.state_dict(),
                      "sched": sched.state_dict(), "epoch": epoch + 1, "elapsed": elapsed,
                      "history": history}, last)

    recalibrated = recalibrate_batchnorm(model, _recalibration_images(x_train))
    model.eval()
    test_acc = accuracy(model, x_test, y_test)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {
        "name": name, "architecture": spec["arch"], "kwargs": config["kwargs"],
        "c": config["kwargs"].get("c"), "input": list(spec["input"]), "dataset": spec["dataset"],
        "num_classes": 10, "train_sha256": train_sha, "test_sha256": test_sha, "seed": seed,
        "epochs": epochs, "recipe": recipe, "wall_time_s": round(elapsed, 1),
        "device": _device_name(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "test_accuracy": test_acc, "test_n": len(y_test), "history": history,
        "weights_sha256": weights_sha256(state),
        "cpu_fallback": is_cpu_fallback(name, config["kwargs"].get("c")), "paper_c": PAPER_C.get(name),
        "bn_recalibrated_on": RECALIBRATION_IMAGES if recalibrated else 0,
    }
    _atomic_save(state, run_dir / f"{name}.pt")
    (run_dir / f"{name}.json").write_text(json.dumps(meta, indent=1))
    print(f"{name}: test accuracy {test_acc:.4f} ({len(y_test)} images), {elapsed / 60:.1f} min", flush=True)
    return meta


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({cpu_model()}, {torch.get_num_threads()} thread(s))"


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else the platform's machine type."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()



def export(name: str, out_dir="runs", dest=None, data_dir=None, half: bool = True) -> dict:
    """Copy a finished run's weights into the shipped checkpoints (``dest``, default the
    package's ``checkpoints/``), after :func:`recalibrate_batchnorm` for runs that predate it,
    as float16 when that leaves the full-test accuracy unchanged
    (BatchNorm statistics and normalisation buffers stay float32); rewrites the metadata with
    the accuracy measured on the shipped weights, their dtype and sha256."""
    from . import CHECKPOINTS, evaluate, load_state

    run_dir = Path(out_dir) / name
    meta = json.loads((run_dir / f"{name}.json").read_text())
    state = load_state(run_dir / f"{name}.pt")
    spec = SPECS[name]
    x_test, y_test, _, _ = _arrays(spec["dataset"], "test", data_dir, None)
    model = build(name, **meta["kwargs"])
    model.load_state_dict(state)
    needs = any(isinstance(m, nn.Dropout) for m in model.modules()) and any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if "bn_recalibrated_on" not in meta and needs:  # runs made before recalibration was part of train()
        meta["test_accuracy_before_bn_recalibration"] = accuracy(model, x_test, y_test)
        x_train = _arrays(spec["dataset"], "train", data_dir, Path(out_dir))[0]
        recalibrate_batchnorm(model, _recalibration_images(x_train))
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    meta["bn_recalibrated_on"] = meta.get("bn_recalibrated_on") or (RECALIBRATION_IMAGES if needs else 0)
    acc32 = accuracy(model, x_test, y_test)
    shipped, dtype, acc = state, "float32", acc32
    if half:
        small = {k: v.half() if v.is_floating_point() and "running_" not in k and "normalize" not in k else v
                 for k, v in state.items()}
        model.load_state_dict({k: v.float() for k, v in small.items()})
        acc16 = accuracy(model, x_test, y_test)
        if acc16 >= acc32:
            shipped, dtype, acc = small, "float16", acc16
    model.load_state_dict({k: v.float() for k, v in shipped.items()})
    subset = evaluate(name, data_dir=data_dir, limit=2000, model=model)
    c = meta["kwargs"].get("c")
    if meta.get("device", "").startswith("cpu"):
        meta["cpu_model"] = cpu_model()
    meta.update({"test_accuracy": acc, "test_accuracy_float32": acc32, "test_n": len(y_test),
                 "storage_dtype": dtype, "weights_sha256": weights_sha256(shipped),
                 "test2000_accuracy": subset["accuracy"], "test2000_identity": subset["identity"],
                 "cpu_fallback": is_cpu_fallback(name, c),
                 "paper_c": PAPER_C.get(name)})
    dest = Path(dest) if dest else CHECKPOINTS
    dest.mkdir(parents=True, exist_ok=True)
    _atomic_save(shipped, dest / f"{name}.pt")
    (dest / f"{name}.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta
