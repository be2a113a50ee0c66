"""Shared test fixtures: real clips live in ../shared/data beside the project (never committed)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# The Whisper trace cache (talkinghead.audio.whisper.cache_folder) of this test run: its own, empty at the
# start (the tests exercise both the first, caching load and the cached one), inherited by the CLI
# subprocesses, removed at the end; never the user's ~/.cache.
CACHE = os.environ["TALKINGHEAD_CACHE"] = tempfile.mkdtemp(prefix="talkinghead-test-cache-")


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(CACHE, ignore_errors=True)


def shared_clip(name: str) -> Path:
    """Path of a real clip in ../shared/data; skips the test cleanly when it is absent."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"shared data not available: {path}")
    return path


@pytest.fixture
def clip():
    return shared_clip


@pytest.fixture
def one_torch_thread():
    """One torch intra-op thread, as the CLI defaults to: these workloads are many small ops, and on shared
    cores two OpenMP threads waiting for each other were measured up to 10x slower than one."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
