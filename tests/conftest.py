from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
#: Real structures shared beside the checkout (never copied into the repository).
RNA_PUZZLES = REPO_ROOT.parent / "shared" / "data" / "rna_puzzles"


@pytest.fixture(scope="session")
def rna_puzzles() -> Path:
    if not RNA_PUZZLES.is_dir():
        pytest.fail(f"shared data not found at {RNA_PUZZLES}; it must sit beside the checkout")
    return RNA_PUZZLES


@pytest.fixture(scope="module")
def one_intra_op_thread():
    """Run tiny tensor ops on one thread: on a shared 2-core machine, OpenMP threads spinning
    against other processes made them up to 30x slower."""
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n_threads)
