import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

NO_DATA = ("UVOOD_DATA is not set: the tests on real data skip. Set UVOOD_DATA to the data folder (e.g. "
           "../shared/data) to run them; .ci/run does.")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def require_data_file(folder: Path, name: str) -> Path:
    """``folder / name``, for a test on real data. Without ``UVOOD_DATA`` the test skips (nothing was asked for);
    with it, a missing file FAILS the test: a run that was given data must not pass on skips."""
    path = Path(folder) / name
    if not path.is_file():
        if os.environ.get("UVOOD_DATA"):
            pytest.fail(f"UVOOD_DATA={os.environ['UVOOD_DATA']} is set but {name} is not in it ({path}): put the "
                        "file there (uvood data download) or unset UVOOD_DATA to skip the tests on real data.",
                        pytrace=False)
        pytest.skip(NO_DATA)
    return path


@pytest.fixture(scope="session")
def data_dir():
    """The real data folder, ``$UVOOD_DATA``, and nowhere else: unset, the tests that need it skip (with the reason);
    set, a missing ``mnist_test.npz`` fails them, and a corrupt file fails the test that reads it."""
    if not os.environ.get("UVOOD_DATA"):
        pytest.skip(NO_DATA)
    path = Path(os.environ["UVOOD_DATA"]).resolve()  # absolute: CI gives ../shared/data and some tests chdir
    require_data_file(path, "mnist_test.npz")
    return path
