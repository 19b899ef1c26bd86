"""The command line: registry listing, scoring to CSV, demo, clear errors."""

import csv

import numpy as np
import pytest

from uvood.cli import main


def test_help_and_scores(capsys):
    assert main([]) == 0
    assert "COMMAND" in capsys.readouterr().out
    assert main(["scores"]) == 0
    out = capsys.readouterr().out
    for name in ("msp", "energy(T=1.0)", "norm(p)", "gradnorm", "varsum"):
        assert name in out


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
])
def test_errors_are_clear(argv, msg, capsys, tmp_path):
    assert main(argv) == 2
    assert msg in capsys.readouterr().err


def test_unknown_score_in_score_command(tmp_path, capsys):
    np.savez(tmp_path / "d.npz", x=np.zeros((2, 28, 28, 1), np.uint8), y=np.zeros(2, np.int64))
    assert main(["score", "--model", "mnist-mlp", "--data", str(tmp_path / "d.npz"), "--score", "norm(0.3)*enrgy",
                 "--out", str(tmp_path / "s.csv")]) == 2
    assert "Closest valid names" in capsys.readouterr().err


def test_demo_runs_offline(capsys):
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "AUROC" in out and "norm(0.3)*energy" in out and "gradnorm" in out
