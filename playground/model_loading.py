"""Loading the local model kinds: the embedded SmolLM2, transformers folders, `.gguf` files and Yuan2 folders.

Each loader returns a `LoadedModel`: the model on its device, its tokenizer and chat format, and what the status
line shows. The manager makes it current; nothing here holds state.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from playground.chat_format import ChatFormat, PlainChatFormat, TemplateChatFormat
from playground.errors import ModelFolderError, ParameterError

Progress = Callable[[float, str], None]
EMBEDDED = "embedded"
ALIGNED_PREFILL_TOKENS = 32


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    chat_format: ChatFormat
    name: str
    kind: str  # "embedded", "transformers", "gguf", "yuan", "yuan-int4", "yuan-gguf", "yuan-gguf-q4_0"
    path: str
    device: str
    dtype: str
    parameters: int
    memory_bytes: int
    load_time_s: float
    context_length: int
    has_experts: bool = False
    prefill_chunk_tokens: int | None = None  # a long prompt is computed this many tokens at a time (None: at once)
    # Chunks start at multiples of prefill_chunk_tokens, and the prompt cache resumes a prompt only there: a prompt is
    # computed in the same pieces whatever the cache held, so its numbers do not depend on it.
    aligned_prefill: bool = False
    loaded_at: float = field(default_factory=time.time)  # when it was ready (Unix time): /v1/models' "created"

    @property
    def resume_step(self) -> int:
        """A cached prompt resumes at a multiple of this many tokens (1: anywhere)."""
        return self.prefill_chunk_tokens if self.aligned_prefill and self.prefill_chunk_tokens else 1


def build_local_model(target: str, device: str, dtype: str, report: Progress) -> LoadedModel:
    """Load `target` (EMBEDDED, a model folder or a .gguf file) on `device`; `report(fraction, message)` as it goes."""
    if target == EMBEDDED:
        from playground.embedded import EMBEDDED_NAME, ensure_converted

        folder = ensure_converted(report)
        loaded = _load_transformers_folder(folder, device, dtype, report, name=EMBEDDED_NAME, kind="embedded")
        return _four_bit_layers_on_int4_kernels(loaded, dtype)
    path = Path(target).expanduser()
    if not path.exists():
        raise ModelFolderError(f"model folder {path} does not exist")
    from playground.models.yuan.loading import is_yuan_gguf

    if is_yuan_gguf(path):  # the vendor's GGUF of Yuan2-M32 (a file, a part, or a folder of parts)
        return _load_yuan_folder(path, device, dtype, report)
    if path.is_file():
        if path.suffix == ".gguf":
            return _load_gguf(path, device, dtype, report)
        raise ModelFolderError(f"{path} is a file; give a model folder (or a .gguf file)")
    if _model_type(path) == "yuan":
        return _load_yuan_folder(path, device, dtype, report)
    return _load_transformers_folder(path, device, dtype, report, name=model_name(path), kind="transformers")


def model_name(folder: Path) -> str:
    """A folder's model name: its own name, or for a hub cache snapshot (models--OWNER--NAME/snapshots/REV) the
    repo's NAME rather than the 40-hex revision."""
    parent = folder.parent
    if parent.name == "snapshots" and parent.parent.name.startswith("models--"):
        return parent.parent.name.split("--")[-1]
    return folder.name

def _load_transformers_folder(folder, device, dtype, report, name, kind) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ModelFolderError(f"{folder} has no config.json; is it a model folder?")
    if not list(folder.glob("*.safetensors")):
        raise ModelFolderError(f"{folder} has no *.safetensors weights (only safetensors are read, never pickle)")
    report(0.2, f"loading {name}")
    torch_dtype = resolve_dtype(dtype, device)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch_dtype, local_files_only=True, trust_remote_code=False, use_safetensors=True
    )
    return _finish(model, tokenizer, name, kind, str(folder), device, report)

def _load_gguf(path: Path, device, dtype, report) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    report(0.2, f"dequantising {path.name}")
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=resolve_dtype(dtype, device))
    loaded = _finish(model, tokenizer, path.stem, "gguf", str(path), device, report)
    return _four_bit_layers_on_int4_kernels(loaded, dtype)


def _four_bit_layers_on_int4_kernels(loaded: LoadedModel, dtype: str) -> LoadedModel:
    """A model read from a GGUF, on CPU with dtype auto: its layers that hold whole 4-bit groups (Q4_1) run on the
    int4 kernel (`models/int4_linear.py`), prompts in aligned chunks; `--dtype float32` keeps the float model."""
    if loaded.device != "cpu" or dtype not in (None, "", "auto"):
        return loaded
    from playground.models.int4_linear import use_int4_kernels

    swapped = use_int4_kernels(loaded.model)
    if swapped:
        loaded.dtype = f"{loaded.dtype} + int4 kernels ({swapped} Q4 layers)"
        loaded.memory_bytes = _memory_bytes(loaded.model)
        # bf16 activations turn the last-bit differences between a prompt computed whole and one resumed from the
        # prompt cache into different replies; computed in the same aligned chunks either way, they are identical.
        loaded.prefill_chunk_tokens, loaded.aligned_prefill = ALIGNED_PREFILL_TOKENS, True
    return loaded


def _load_yuan_folder(path: Path, device, dtype, report) -> LoadedModel:
    from playground.models.yuan.gguf_yuan import gguf_model_name
    from playground.models.yuan.loading import check_yuan_folder, load_yuan
    from playground.models.yuan.precision import PREFILL_CHUNK_TOKENS
    from playground.models.yuan.prompt import YuanChatFormat

    folder = check_yuan_folder(path)  # names the missing or damaged file before anything is built
    # "auto": INT4 runs on int4 kernels (bf16 weights, fp32 activations on CPU; bf16 on CUDA), float folders in
    # the checkpoint's dtype on CUDA and fp32 on CPU; "float32" is the exact mode (playground.models.yuan.precision).
    torch_dtype = None if dtype in (None, "", "auto") else resolve_dtype(dtype, device)
    model, tokenizer = load_yuan(folder, device=device, dtype=torch_dtype, progress=report)
    if folder.gguf is not None:
        name, kind = gguf_model_name(folder.gguf), "yuan-gguf-q4_0" if folder.quantized else "yuan-gguf"
    else:
        name, kind = model_name(path), "yuan-int4" if folder.quantized else "yuan"
    loaded = _finish(model, tokenizer, name, kind, str(path), device, report, chat_format=YuanChatFormat(tokenizer),
                     has_experts=True)
    loaded.prefill_chunk_tokens = PREFILL_CHUNK_TOKENS
    return loaded

def _finish(model, tokenizer, name, kind, path, device, report, chat_format=None, has_experts=False):
    report(0.9, f"moving to {device}")
    if str(getattr(model, "device", device)) != device:
        model = model.to(device)
    model.eval()
    if chat_format is None:
        chat_format = TemplateChatFormat(tokenizer) if getattr(tokenizer, "chat_template", None) else PlainChatFormat()
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    # Packed INT4 layers hold their weights as buffers: count them as the weights they stand for.
    parameters = sum(p.numel() for p in model.parameters()) + sum(
        m.in_features * m.out_features for m in model.modules() if hasattr(m, "qweight")
    )
    memory = _memory_bytes(model)
    dtype = next((str(p.dtype) for p in model.parameters() if p.is_floating_point()), "unknown")
    if getattr(model, "compute_precision", None) is not None:  # Yuan: mixed precisions, described by the loader
        dtype = model.compute_precision.describe()
    context = int(
        getattr(model.config, "max_position_embeddings", None)
        or getattr(tokenizer, "model_max_length", None)
        or 2048
    )
    return LoadedModel(
        model=model, tokenizer=tokenizer, chat_format=chat_format, name=name, kind=kind, path=path,
        device=device, dtype=dtype.replace("torch.", ""), parameters=parameters, memory_bytes=memory,
        load_time_s=0.0, context_length=context, has_experts=has_experts,
    )


def _memory_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def _model_type(folder: Path) -> str | None:
    """config.json's model_type, or None when there is no readable config (the loader then says what is wrong)."""
    try:
        return json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def resolve_device(device: str) -> str:
    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ParameterError(f"device {device!r} was asked for, but CUDA is not available here", field="device")
    if device not in ("cpu", "mps") and not device.startswith("cuda"):
        raise ParameterError(f"unknown device {device!r}; use auto, cpu or cuda[:N]", field="device")
    return device


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype in (None, "", "auto"):
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype not in DTYPES:
        raise ParameterError(f"unknown dtype {dtype!r}; use auto, float32, float16 or bfloat16", field="dtype")
    return DTYPES[dtype]


__all__ = ["DTYPES", "EMBEDDED", "LoadedModel", "Progress", "build_local_model", "resolve_device", "resolve_dtype"]
