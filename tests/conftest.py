from __future__ import annotations

import socket
import subprocess
import uuid
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
#: Real structures shared beside the checkout (never copied into the repository).
RNA_PUZZLES = REPO_ROOT.parent / "shared" / "data" / "rna_puzzles"


#: The smallest debug-scenario run that trains, validates and checkpoints: seconds on a CPU.
TINY_RUN = [
    "data.n_train=8",
    "data.n_val=2",
    "data.max_length=28",
    "trainer.micro_batch_size=4",
    "trainer.epochs=2",
    "trainer.val_max_structures=2",
    "trainer.val_sampler_steps=2",
]


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory):
    """One sqlite MLflow store (``MLFLOW_TRACKING_URI``) and working directory for a module:
    creating a store takes seconds, so tests of a module share one."""
    path = tmp_path_factory.mktemp("store")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{path / 'mlflow.db'}")
        mp.chdir(path)
        yield path


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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (for test servers)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def pg_url():
    """A throwaway PostgreSQL database on 127.0.0.1:5432 (trust auth), dropped afterwards."""
    psycopg = pytest.importorskip("psycopg", reason="the dev extra installs psycopg")
    name = f"diffold_test_{uuid.uuid4().hex[:10]}"
    admin = "postgresql://postgres@127.0.0.1:5432/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


@pytest.fixture
def small_fs(tmp_path):
    """Mount a tmpfs of the asked size; unmounted afterwards."""
    mounted = []

    def mount(size: str) -> Path:
        point = tmp_path / f"fs-{len(mounted)}"
        point.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)
