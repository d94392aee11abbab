"""Shared fixtures: the real app launched once per test session on a free loopback port."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from harness import REPO, LaunchedServer

SHARED = REPO.parent / "shared"
YUAN_TOKENIZER_DIR = SHARED / "yuan2-tokenizer"
# Converted models are cached inside the repo (ignored by git) so reruns skip the GGUF conversion.
os.environ.setdefault("PLAYGROUND_CACHE_DIR", str(REPO / ".cache"))
# Chats and lab runs the tests make go to a throw-away folder, never the user's data directory.
os.environ.setdefault("PLAYGROUND_DATA_DIR", tempfile.mkdtemp(prefix="playground-test-data-"))


@pytest.fixture(scope="session")
def launched_server(tmp_path_factory):
    """The real app with the real embedded model, started once for the whole test session."""
    server = LaunchedServer(log_dir=tmp_path_factory.mktemp("server"))
    try:
        server.wait_until(("ready",))
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def yuan_tokenizer_dir() -> Path:
    assert (YUAN_TOKENIZER_DIR / "tokenizer.model").is_file(), f"missing {YUAN_TOKENIZER_DIR}"
    return YUAN_TOKENIZER_DIR


@pytest.fixture(scope="session")
def embedded_manager():
    """A model manager of this test process with the embedded model, loaded once for the session (what the app's
    entry point builds; in-process tests share it as the app's tabs and routes share theirs)."""
    from playground.manager import ModelManager

    manager = ModelManager()
    manager.load()
    return manager
