"""``--device`` and the API following the model's device. CUDA tests run where a GPU is present."""

import pytest
import torch

import uvood
from uvood import devices
from uvood.cli import main
from uvood.errors import UvoodError

NO_CUDA = "no CUDA GPU on this machine (torch.cuda.is_available() is False): the CUDA paths are not exercised here"


def test_unknown_and_unavailable_devices_are_refused_with_the_fix():
    with pytest.raises(UvoodError, match="not a device name: use cpu, cuda, cuda:N"):
        devices.parse_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(UvoodError, match="no CUDA GPU .* Use --device cpu"):
            devices.parse_device("cuda:1")
    else:
        n = torch.cuda.device_count()
        with pytest.raises(UvoodError, match=f"has {n} CUDA GPU"):
            devices.parse_device(f"cuda:{n}")


@pytest.mark.parametrize("command", [["score", "--model", "mnist-mlp", "--data", "x.npz"], ["bench", "small"],
                                     ["zoo", "eval", "mnist-mlp"], ["demo"], ["zoo", "train", "mnist-mlp"]])
def test_every_model_command_takes_device_and_checks_it_first(command, capsys):
    assert main([*command, "--device", "tpu"]) == 2
    assert "--device 'tpu' is not a device name" in capsys.readouterr().err
    assert devices.default_device() == torch.device("cpu")


def test_a_commands_device_does_not_outlive_the_command(tmp_path, monkeypatch, capsys):
    """``main([..., "--device", "cpu"])`` sets the default device for that command only: a program that calls
    ``main`` and then loads models keeps its own default (here a sentinel device), on success and on error."""
    monkeypatch.setattr(devices, "_DEFAULT", [torch.device("meta")])
    assert main(["score", "--model", "mnist-mlp", "--data", str(tmp_path / "missing.npz"), "--device", "cpu"]) == 2
    assert "missing.npz" in capsys.readouterr().err
    assert devices.default_device() == torch.device("meta")


def test_zoo_models_load_onto_the_requested_device():
    model = uvood.zoo.load("mnist-mlp", device="cpu")
    assert devices.model_device(model) == torch.device("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
def test_cuda_scores_equal_cpu_scores():
    model = uvood.zoo.load("mnist-mlp")
    x = torch.rand(64, 1, 28, 28)
    for spec in ("gradnorm(depth=deep)", "norm(0.3)*energy"):
        cpu = uvood.score_model(spec, model, x, progress=False, dtype="float64")
        gpu = uvood.score_model(spec, uvood.zoo.load("mnist-mlp", device="cuda"), x, progress=False, dtype="float64")
        assert gpu.device.type == "cpu"
        torch.testing.assert_close(gpu, cpu, rtol=1e-9, atol=0)
    f_cpu = uvood.extract(model, x, progress=False)
    f_gpu = uvood.extract(uvood.zoo.load("mnist-mlp", device="cuda"), x, progress=False)
    torch.testing.assert_close(f_gpu.logits, f_cpu.logits, rtol=1e-4, atol=1e-5)


def _recording_model(dtype):
    """A small CNN in ``dtype`` that records the (device, dtype) of every input it is given."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(144, 3)).to(dtype).eval()
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append((args[0].device, args[0].dtype)))
    return model, seen


def test_probes_and_fit_anchors_follow_the_models_dtype_and_device():
    """A float64 model given float32 CPU probes (the runner's head probe, BatchGrad's fit probe): every tensor
    that reaches the model is in the model's dtype, on its device."""
    from uvood.model import find_head
    from uvood.scores.fitted import head_weights
    from uvood.scores.gradient import check_head_bias

    model, seen = _recording_model(torch.float64)
    x = torch.rand(12, 1, 8, 8)  # float32, as images come
    y = torch.arange(12) % 3
    assert find_head(model, x[:1]) is model[3]
    w, b = head_weights(model, devices.probe(model, (1, 1, 8, 8)))
    assert w.shape == (3, 144) and b.shape == (3,)
    check_head_bias(uvood.get_score("gradnorm(bias=true)"), model, x[:1])
    for spec in ("batchgrad", "batchgrad(bias=true)", "batchgrad(depth=deep)"):
        uvood.get_score(spec).fit(model, x, y)
    assert seen and set(seen) == {(torch.device("cpu"), torch.float64)}
    assert devices.probe(model, (1, 1, 8, 8)).dtype == torch.float64
    assert devices.follow(y, model).dtype == torch.int64  # labels keep their integer type


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
def test_probes_follow_a_cuda_model():
    from uvood.scores.gradient import check_head_bias

    model, seen = _recording_model(torch.float32)
    model = model.cuda()
    x = torch.rand(12, 1, 8, 8)
    check_head_bias(uvood.get_score("gradnorm(bias=true)"), model, x[:1])
    uvood.get_score("batchgrad").fit(model, x, torch.arange(12) % 3)
    assert {d.type for d, _ in seen} == {"cuda"}
