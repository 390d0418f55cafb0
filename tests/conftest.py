import os
from pathlib import Path

import pytest
import torch

# CI has 2 cores; tests that spawn 2 ranks must not each grab both.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"  # recorded from the reference implementation (see its README.md)


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES
