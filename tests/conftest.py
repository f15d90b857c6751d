from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
#: Real structures shared beside the checkout (never copied into the repository).
RNA_PUZZLES = REPO_ROOT.parent / "shared" / "data" / "rna_puzzles"


@pytest.fixture(scope="session")
def rna_puzzles() -> Path:
    if not RNA_PUZZLES.is_dir():
        pytest.fail(f"shared data not found at {RNA_PUZZLES}; it must sit beside the checkout")
    return RNA_PUZZLES
