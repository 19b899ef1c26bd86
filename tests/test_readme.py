"""The README's Python snippet runs as written (it is read from README.md, so it cannot drift)."""

import re
from pathlib import Path

import torch

import uvood

REPO = Path(__file__).resolve().parents[1]


def _snippet() -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Use it on your model"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_snippet_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # it writes detector.pt and .uvood_cache/
    ns: dict = {}
    exec(compile(_snippet(), "README.md", "exec"), ns)
    is_ood = ns["is_ood"]
    assert is_ood.dtype == torch.bool and is_ood.shape == (100,)
    assert is_ood[50:].float().mean() > is_ood[:50].float().mean()  # flags the Fashion-MNIST half more often
    assert ns["det"].threshold == uvood.metrics.threshold_at_tpr(ns["det"].score(ns["x_id"]), 0.95)
    auroc, fpr = map(float, capsys.readouterr().out.split())
    assert auroc == uvood.metrics.auroc(ns["s_id"], ns["s_ood"]) > 0.5 and 0 <= fpr <= 1
    assert ns["s"].shape == (20,) and (tmp_path / "detector.pt").is_file()
