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


# `make test` runs two workers that take whole modules in collection order (`-n 2 --dist loadfile
# --no-loadscope-reorder`), so that module fixtures start once; the modules on the session's launched server go to one
# worker together, so that one server starts, not one per worker (`pytest_xdist_make_scheduler`). The longest modules
# (by `--durations`, in worker-seconds) go first, so that the two workers end together instead of one waiting for the
# other's last long module.
LONGEST_MODULES = ("test_vllm_plugin.py", "test_browser.py", "test_langchain_standard.py", "test_space_simulation.py",
                   "test_benches.py", "test_browser_trust.py", "test_yuan_gguf.py", "test_prompt_cache.py",
                   "test_remote_faults.py", "test_persistence_e2e.py", "test_langchain.py")
# The scheduler sees test ids only, so the modules that use `launched_server` are named; collection checks the list.
SERVER_MODULES = ("test_api.py", "test_app_e2e.py", "test_bad_input.py", "test_browser.py", "test_browser_history.py",
                  "test_browser_lab.py", "test_insight_e2e.py", "test_langchain.py", "test_remote.py",
                  "test_structured.py")


def pytest_collection_modifyitems(items):
    rank = {name: index for index, name in enumerate(LONGEST_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each module's own order is kept
    unlisted = {item.path.name for item in items if "launched_server" in item.fixturenames} - set(SERVER_MODULES)
    if unlisted:
        raise pytest.UsageError(f"{sorted(unlisted)} use launched_server: add them to SERVER_MODULES in {__file__}")


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist: without it installed, pytest still starts
def pytest_xdist_make_scheduler(config, log):
    """`--dist loadfile`, with the SERVER_MODULES as one unit of work."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class ServerModulesTogether(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = super()._split_scope(nodeid)
            return "launched_server" if Path(module).name in SERVER_MODULES else module

    return ServerModulesTogether(config, log)


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
    yield manager
    manager.close()


@pytest.fixture
def new_manager():
    """A factory of model managers that are closed (their threads stopped, their models let go) after the test."""
    from playground.manager import ModelManager

    made = []

    def make(**kwargs):
        made.append(ModelManager(**kwargs))
        return made[-1]

    yield make
    for manager in made:
        manager.close()


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """A random 2-layer Llama with the embedded model's tokenizer and chat template, saved as safetensors (shared by
    the manager, fault and security tests)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from playground.embedded import ensure_converted

    tokenizer = AutoTokenizer.from_pretrained(ensure_converted())
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
