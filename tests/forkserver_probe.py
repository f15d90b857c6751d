"""A dataset module that logs each process importing it, for the forkserver preload test of
``test_data_loader.py`` (``FORKSERVER_PROBE_LOG`` names the log)."""

from __future__ import annotations

import os

from pipeline.data.datasets import CroppedDataset

if os.environ.get("FORKSERVER_PROBE_LOG"):
    with open(os.environ["FORKSERVER_PROBE_LOG"], "a") as log:
        log.write(f"{os.getpid()}\n")


class ProbeDataset(CroppedDataset):
    """A synthetic training set that workers unpickle by reference to this module."""
