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
                                     ["zoo", "eval", "mnist-mlp"]])
def test_every_model_command_takes_device_and_checks_it_first(command, capsys):
    assert main([*command, "--device", "tpu"]) == 2
    assert "--device 'tpu' is not a device name" in capsys.readouterr().err
    assert devices.default_device() == torch.device("cpu")


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
