"""The command line: registry listing, scoring to CSV, demo, clear errors."""

import csv
from pathlib import Path

import numpy as np
import pytest

from uvood.cli import main


def test_help_and_scores(capsys):
    assert main([]) == 0
    assert "COMMAND" in capsys.readouterr().out
    assert main(["scores"]) == 0
    out = capsys.readouterr().out
    for name in ("msp", "energy(T=1.0)", "norm(p)", "gradnorm", "varsum", "mahalanobis(normalize=False)", "knn(k)",
                 "react(p)", "ash_b(p)", "odin(T=1000.0, eps=0.0014)", "gen(gamma=0.1, M=100, eps=0.0)"):
        assert name in out
    from uvood.scores.registry import entries

    listed = {line.split()[0].split("(")[0] for line in out.splitlines() if line.startswith("  ")}
    assert listed == set(entries()), "every registered name is listed, whatever its kind"


def test_score_writes_one_row_per_input(tmp_path, capsys):
    g = np.random.default_rng(0)
    x = g.integers(0, 256, (7, 28, 28, 1), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(7) % 10)
    out = tmp_path / "s.csv"
    assert main(["score", "--model", "mnist-mlp", "--data", str(tmp_path / "d.npz"), "--score", "msp",
                 "--score", "norm(0.3)*energy", "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == 7 and set(rows[0]) >= {"index", "label", "prediction", "msp", "norm(0.3)*energy"}
    assert all(0 < float(r["msp"]) <= 1 for r in rows)


def test_score_runs_one_deep_pass_for_every_deep_score(tmp_path, monkeypatch):
    """Several deep gradient specs on `uvood score` share ONE fused deep pass per batch, with the values of
    separate calls of uvood.score_model."""
    import torch

    import uvood.scores.fused as fused
    from uvood import zoo
    from uvood.api import score_model

    x = np.random.default_rng(1).integers(0, 256, (9, 28, 28, 1), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x=x)
    calls = []
    real = fused.deep_pass
    monkeypatch.setattr(fused, "deep_pass", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    specs = ["gradnorm(depth=deep)", "exgrad(depth=deep)", "msp"]
    out = tmp_path / "s.csv"
    argv = ["score", "--model", "mnist-mlp", "--data", str(tmp_path / "d.npz"), "--out", str(out), "--batch-size", "16"]
    assert main(argv + sum((["--score", s] for s in specs), [])) == 0
    assert len(calls) == 1
    rows = list(csv.DictReader(open(out)))
    model = zoo.load("mnist-mlp")
    xs = torch.from_numpy(x).permute(0, 3, 1, 2)
    for spec in specs[:2]:
        got = np.array([float(r[spec]) for r in rows])
        want = score_model(spec, model, xs, progress=False).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-6)


def test_score_reads_a_folder_of_images(tmp_path):
    from PIL import Image

    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((40, 30, 3), 60 * i, np.uint8)).save(tmp_path / "imgs" / cls / f"{i}.png")
    assert main(["score", "--model", "mnist-mlp", "--data", str(tmp_path / "imgs"), "--score", "tv",
                 "--out", str(tmp_path / "o.csv")]) == 0
    assert len(list(csv.DictReader(open(tmp_path / "o.csv")))) == 4


@pytest.mark.parametrize("argv,msg", [
    (["score", "--model", "mnist-mlp", "--data", "missing.npz"], "No data at"),
    (["score", "--model", "no-such-model", "--data", "x.npz"], "no zoo model"),
    (["bench", "nonsense"], "Unknown benchmark"),
    (["bench", "small", "--scores", "enrgy"], "Unknown score"),
    (["score", "--model", "mnist-mlp", "--data", "x.npz", "--input-shape", "3,32,32"], "does not match zoo model"),
])
def test_errors_are_clear(argv, msg, capsys, tmp_path):
    assert main(argv) == 2
    assert msg in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["bench", "small", "--deep-n", "0"],
    ["bench", "small", "--n", "-3"],
    ["bench", "small", "--images", "ten"],
    ["score", "--model", "mnist-mlp", "--data", "x.npz", "--batch-size", "0"],
    ["zoo", "eval", "mnist-mlp", "--limit", "0"],
    ["zoo", "train", "mnist-mlp", "--epochs", "0"],
])
def test_counts_must_be_positive_integers(argv, capsys):
    """A count of 0 used to read as "not given" (``n or default``) and silently ran the default."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and "give an integer >= 1" in capsys.readouterr().err


def test_unknown_score_in_score_command(tmp_path, capsys):
    np.savez(tmp_path / "d.npz", x=np.zeros((2, 28, 28, 1), np.uint8), y=np.zeros(2, np.int64))
    assert main(["score", "--model", "mnist-mlp", "--data", str(tmp_path / "d.npz"), "--score", "norm(0.3)*enrgy",
                 "--out", str(tmp_path / "s.csv")]) == 2
    assert "Closest valid names" in capsys.readouterr().err


def test_demo_runs_offline(capsys):
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "AUROC" in out and "norm(0.3)*energy" in out and "gradnorm" in out


# ---------------------------------------------------------------- every error: one line, exit 2, no traceback


def _one_line_error(capsys, code, msg):
    err = capsys.readouterr().err
    assert code == 2 and msg in err, err
    assert err.startswith("uvood: error: ") and err.count("\n") == 1 and "Traceback" not in err


def _spec_file(tmp_path, edit):
    import json
    from importlib import resources

    raw = json.loads(resources.files("uvood.bench").joinpath("specs", "small.json").read_text())
    text = edit(raw)
    (tmp_path / "spec.json").write_text(text if isinstance(text, str) else json.dumps(text))
    return str(tmp_path / "spec.json")


@pytest.mark.parametrize("edit,msg", [
    (lambda raw: '{"name": "small", ', "is not valid JSON (Expecting property name"),
    (lambda raw: [raw], "must be a JSON object with the fields"),
    (lambda raw: {k: v for k, v in raw.items() if k != "pairs"}, "must be a JSON object with the fields"),
    (lambda raw: {**raw, "colour": "red"}, "it has ['colour', 'cross_domain'"),
    (lambda raw: {**raw, "groups": ["table1", "tabel2"]},
     "unknown group(s) ['tabel2']; choose among ['claims', 'figure2'"),
    (lambda raw: {**raw, "pairs": [["MNIST"]]}, "'pairs' must be a list of [ID, OOD] name pairs"),
])
def test_bad_bench_spec_is_a_clear_error(tmp_path, capsys, edit, msg):
    _one_line_error(capsys, main(["bench", _spec_file(tmp_path, edit), "--out", str(tmp_path / "o")]), msg)


@pytest.mark.parametrize("spec", ["batchgrad", "norm(1)*batchgrad(depth=deep)"])
def test_score_command_refuses_a_score_that_needs_fitting(tmp_path, capsys, spec):
    np.savez(tmp_path / "d.npz", x=np.zeros((2, 28, 28, 1), np.uint8))
    code = main(["score", "--model", "mnist-mlp", "--data", str(tmp_path / "d.npz"), "--score", spec,
                 "--out", str(tmp_path / "s.csv")])
    _one_line_error(capsys, code, "must first be fitted on ID training data: add --fit ID.npz")


def test_score_fits_on_an_id_file_and_equals_the_api(tmp_path, capsys, data_dir):
    import torch

    from uvood import zoo
    from uvood.data import load, to_model_format
    from uvood.scores import get_score

    train = load("mnist", "train", data_dir=data_dir, limit=300)
    test = load("mnist", "test", data_dir=data_dir, limit=9)
    np.savez(tmp_path / "id.npz", x=train.x, y=train.y)
    np.savez(tmp_path / "d.npz", x=test.x)
    out = tmp_path / "s.csv"
    specs = ["mahalanobis", "knn(5)", "react(90)>msp"]
    assert main(["score", "--model", "mnist-mlp", "--data", str(tmp_path / "d.npz"), "--fit", str(tmp_path / "id.npz"),
                 *[a for sp in specs for a in ("--score", sp)], "--out", str(out)]) == 0
    assert "fitted mahalanobis, knn(5), react(90)>msp on 300 ID images" in capsys.readouterr().err
    rows = list(csv.DictReader(open(out)))
    model = zoo.load("mnist-mlp")
    for spec in specs:
        sc = get_score(spec)
        sc.fit(model, to_model_format(train.x, channels=1, size=28), torch.as_tensor(train.y))
        with torch.no_grad():
            from uvood.model import forward_features

            h, z = forward_features(model, to_model_format(test.x, channels=1, size=28))
        want = sc.from_features(h, z).numpy()
        got = np.array([float(r[sc.spec]) for r in rows])
        np.testing.assert_allclose(got, want, rtol=1e-12)


def test_out_paths_that_cannot_be_written(tmp_path, capsys):
    np.savez(tmp_path / "d.npz", x=np.zeros((2, 28, 28, 1), np.uint8))
    (tmp_path / "f").write_text("a file")
    score = ["score", "--model", "mnist-mlp", "--data", str(tmp_path / "d.npz"), "--out"]
    _one_line_error(capsys, main([*score, str(tmp_path / "f" / "s.csv")]), "is a file, not a folder")
    _one_line_error(capsys, main([*score, str(tmp_path)]), "it is a folder. Give a file name")
    _one_line_error(capsys, main(["bench", "small", "--quick", "--scores", "msp", "--out", str(tmp_path / "f" / "o")]),
                    "is a file, not a folder. Choose another --out")
    _one_line_error(capsys, main(["bench", "small", "--quick", "--scores", "msp", "--out", str(tmp_path / "f")]),
                    "is a file, not a folder")
    if Path("/dev/full").exists():  # a write that fails half-way (no space left): still one line
        _one_line_error(capsys, main([*score, "/dev/full"]), "No space left on device")


def test_corrupt_timings_json_stops_the_run_before_any_work_and_survives(tmp_path, capsys, monkeypatch):
    import uvood.bench.runner as runner

    monkeypatch.setattr(runner, "run", lambda *a, **k: pytest.fail("the run started despite the corrupt history"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "timings.json").write_text('[{"date": "2026-01-01", "total_s": 12')
    code = main(["bench", "small", "--quick", "--scores", "msp", "--out", str(out)])
    _one_line_error(capsys, code, "timings.json is not a list of timing records")
    assert (out / "timings.json").read_text() == '[{"date": "2026-01-01", "total_s": 12'
    (out / "timings.json").write_text('{"a": 1}')
    _one_line_error(capsys, main(["bench", "small", "--quick", "--scores", "msp", "--out", str(out)]),
                    "Repair it, move it away")


def test_download_offline_is_a_clear_error(tmp_path, capsys, monkeypatch):
    import urllib.error
    import urllib.request

    def offline(url, filename):
        Path(filename).write_bytes(b"partial")
        raise urllib.error.URLError(OSError(-3, "Temporary failure in name resolution"))

    monkeypatch.setattr(urllib.request, "urlretrieve", offline)
    code = main(["data", "download", "svhn", "--data-dir", str(tmp_path)])
    _one_line_error(capsys, code, "Cannot download http://ufldl.stanford.edu/housenumbers/train_32x32.mat "
                                  "([Errno -3] Temporary failure in name resolution); nothing was kept")
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_is_one_line_and_exit_130(capsys, monkeypatch):
    import uvood.cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(uvood.cli, "_cmd_scores", interrupted)
    assert main(["scores"]) == 130
    assert capsys.readouterr().err == "uvood: interrupted\n"


# ---------------------------------------------------------------- your own model: module:factory + --weights

NET = ("import torch\nfrom torch import nn\n\n\ndef build():\n    torch.manual_seed(5)\n"
       "    return nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10))\n")


def _user_model_files(tmp_path):
    import torch

    (tmp_path / "mynet.py").write_text(NET)
    ns: dict = {}
    exec(NET, ns)
    model = ns["build"]()
    torch.manual_seed(9)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))  # weights other than the factory's own
    torch.save(model.state_dict(), tmp_path / "w.pt")
    g = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=g.integers(0, 256, (9, 28, 28, 1), dtype=np.uint8))
    return model.eval()


def _expected(model, tmp_path, spec):
    import uvood
    from uvood.data import to_model_format

    x = to_model_format(np.load(tmp_path / "d.npz")["x"], channels=1, size=28)
    f = uvood.extract(model, x, progress=False)
    return [repr(float(v)) for v in uvood.score_features(spec, f.h, f.logits)]


@pytest.mark.parametrize("form", ["mynet:build", "mynet.py:build"])
def test_score_your_own_model_with_weights(tmp_path, monkeypatch, form):
    model = _user_model_files(tmp_path)
    monkeypatch.chdir(tmp_path)  # the module is found in the current folder
    assert main(["score", "--model", form, "--weights", "w.pt", "--input-shape", "1,28,28", "--data", "d.npz",
                 "--score", "energy", "--out", "s.csv"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "s.csv")))
    assert [r["energy"] for r in rows] == _expected(model, tmp_path, "energy")


def test_zoo_model_with_other_weights(tmp_path):
    import torch

    import uvood

    model = uvood.zoo.load("mnist-mlp")
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(1).integers(0, 256, (5, 28, 28, 1), dtype=np.uint8))
    assert main(["score", "--model", "mnist-mlp", "--weights", str(tmp_path / "w.pt"), "--data",
                 str(tmp_path / "d.npz"), "--score", "msp", "--out", str(tmp_path / "s.csv")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "s.csv")))
    assert [r["msp"] for r in rows] == _expected(model, tmp_path, "msp")


def test_your_own_model_errors(tmp_path, monkeypatch, capsys):
    import torch
    from torch import nn

    _user_model_files(tmp_path)
    monkeypatch.chdir(tmp_path)
    base = ["score", "--data", "d.npz", "--out", "s.csv"]
    torch.save(nn.Linear(3, 2), "pickled.pt")  # a whole pickled object: never unpickled
    _one_line_error(capsys, main([*base, "--model", "mynet:build", "--input-shape", "1,28,28", "--weights",
                                  "pickled.pt"]), "never unpickles other objects")
    torch.save({"0.weight": torch.zeros(2, 2)}, "other.pt")
    _one_line_error(capsys, main([*base, "--model", "mynet:build", "--input-shape", "1,28,28", "--weights",
                                  "other.pt"]), "do not fit the model: missing ['1.bias'")
    _one_line_error(capsys, main([*base, "--model", "mynet:build"]), "give its input as --input-shape C,H,W")
    _one_line_error(capsys, main([*base, "--model", "w.pt"]), "looks like a weights file")
    _one_line_error(capsys, main([*base, "--model", "mynet:nothing", "--input-shape", "1,28,28"]),
                    "Cannot import the model factory 'mynet:nothing'")
    _one_line_error(capsys, main([*base, "--model", "no_such_module_xyz:build", "--input-shape", "1,28,28"]),
                    "No module named 'no_such_module_xyz'")
    with pytest.raises(SystemExit, match="2"):
        main([*base, "--model", "mynet:build", "--input-shape", "1,28,30"])
    assert "square images (H = W)" in capsys.readouterr().err


def test_the_uvood_command_freezes_the_collector_and_exits_with_mains_status(tmp_path):
    """The console entry point (``uvood``, ``python -m uvood``) is :func:`uvood.cli.console`: ``main``'s exit
    status, with the objects alive at start and exit frozen (so that exit does not walk torch's objects)."""
    import subprocess
    import sys

    import tomllib

    scripts = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["uvood"] == "uvood.cli:console"
    code = ("import gc, sys; from uvood.cli import console; sys.argv = ['uvood'] + sys.argv[1:]; rc = console(); "
            "print(rc, gc.get_freeze_count() > 0)")
    ok = subprocess.run([sys.executable, "-c", code, "scores"], capture_output=True, text=True, timeout=120)
    assert ok.stdout.strip().splitlines()[-1] == "0 True", ok.stderr
    missing = str(tmp_path / "x.npz")
    bad = subprocess.run([sys.executable, "-m", "uvood", "score", "--model", "mnist-mlp", "--data", missing],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "uvood: error:" in bad.stderr
