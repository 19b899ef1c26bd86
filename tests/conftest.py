import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def data_dir():
    """The real data folder (UVOOD_DATA, else ../shared/data beside the repo); skip if absent."""
    path = Path(os.environ.get("UVOOD_DATA", REPO.parent / "shared" / "data"))
    if not (path / "mnist_test.npz").exists():
        pytest.skip(f"real data not found at {path}: set UVOOD_DATA to the data folder to run this test")
    return path
