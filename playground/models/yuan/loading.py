"""Checking and loading Yuan2 model folders: float safetensors (single or sharded) and the release's INT4 GPTQ
checkpoint, whose weights come as byte-split parts (`gptq_model-4bit-128g.safetensors00`, `01`, `02`), read in place
by `safetensors_parts.py`.

Loading builds the model on the meta device (INT4 folders with `QuantLinear` in the quantized places) and then
materialises it tensor by tensor, reading each one's bytes straight into its final storage when the dtype matches.
INT4 weights stay packed; peak memory stays close to the checkpoint's size.

What runs in which precision is decided by `precision.resolve_precision`. With the defaults, every GPTQ layer is
converted right after its tensors are read into a fused kernel's layout (`quant_kernels.py`: PyTorch's int4pack on
CPU and CUDA, Marlin when installed), one layer at a time, so no float copy of the weights ever exists and the
GPTQ buffers are freed as soon as the kernel holds the weights. `dtype=torch.float32` keeps the GPTQ buffers and
the exact dequantising path. Float folders use the checkpoint's dtype on CUDA and float32 on CPU.
"""

from __future__ import annotations

import copy
import ctypes
import json
import logging
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel

from playground.errors import ModelFolderError

from .configuration_yuan import YuanConfig
from .gguf_yuan import (
    ARCH as GGUF_ARCH,
    GGUF_PART,
    GGUFFile,
    config_from_gguf,
    gguf_architecture,
    gguf_weights,
    head_is_embedding,
    read_gguf,
    tokenizer_from_gguf,
)
from .gptq import GPTQSettings, QuantLinear, gptq_settings_from_dict, read_quantize_config
from .modeling_yuan import YuanForCausalLM
from .precision import ROUTER_LINEAR, Precision, apply_precision, resolve_precision
from .quant_kernels import KernelChooser
from .safetensors_parts import SPLIT_PART, WeightIndex, index_weights, read_tensor, tensors_equal

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.model"
QUANTIZE_CONFIG_FILE = "quantize_config.json"
GENERATION_CONFIG_FILE = "generation_config.json"

# Linear layers the release quantised (embeddings, lm_head, norms and the LFA convolutions stay float).
QUANTIZED_LINEAR = re.compile(
    r"^model\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.gate\.(query|key|value)|mlp\.experts\.\d+\.(w1|w2))$"
)

ProgressCallback = Callable[[float, str], None]


# ---------------------------------------------------------------------------------------------------------------------
# Folder checks


@dataclass
class YuanFolder:
    """What `check_yuan_folder` found: enough to load without reading anything twice."""

    path: Path
    config: YuanConfig
    gptq: GPTQSettings | None
    weights: WeightIndex
    tie_lm_head: bool  # lm_head shares the embedding (config default; also when the stored copy is identical)
    skeleton: nn.Module | None = None  # the meta model the check compared the tensors with; the first load uses it
    gguf: GGUFFile | None = None  # set for the vendor's GGUF files: the header (metadata, tokenizer) read once

    def take_skeleton(self) -> nn.Module | None:
        """The checked skeleton, once: a later load of the same folder builds its own."""
        skeleton, self.skeleton = self.skeleton, None
        return skeleton

    @property
    def quantized(self) -> bool:
        return self.gptq is not None

    @property
    def weights_bytes(self) -> int:
        return self.weights.total_bytes


def _read_config_dict(folder: Path) -> dict:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise ModelFolderError(f"missing {CONFIG_FILE} in {folder}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelFolderError(f"{CONFIG_FILE}: not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise ModelFolderError(f"{CONFIG_FILE}: expected a JSON object")
    return data


def is_yuan_folder(path: str | Path) -> bool:
    """Whether `path` is a folder whose config.json says `model_type: "yuan"` (nothing else is checked)."""
    folder = Path(path)
    try:
        return folder.is_dir() and _read_config_dict(folder).get("model_type") == "yuan"
    except ModelFolderError:
        return False


def needs_native_loader(path) -> bool:
    """Yuan folders transformers' own loader cannot read: INT4 GPTQ or byte-split weight parts."""
    try:
        folder = Path(path)
    except TypeError:
        return False
    if not is_yuan_folder(folder):
        return False
    if (folder / QUANTIZE_CONFIG_FILE).is_file() or "quantization_config" in _read_config_dict(folder):
        return True
    return any(SPLIT_PART.match(p.name) for p in folder.iterdir())


def _gptq_settings(folder: Path, config_dict: dict) -> GPTQSettings | None:
    if (folder / QUANTIZE_CONFIG_FILE).is_file():
        return read_quantize_config(folder / QUANTIZE_CONFIG_FILE)
    if "quantization_config" in config_dict:
        return gptq_settings_from_dict(config_dict["quantization_config"], f"{CONFIG_FILE} (quantization_config)")
    return None


def build_model_skeleton(config: YuanConfig, gptq: GPTQSettings | None) -> nn.Module:
    """The model on the meta device, with `QuantLinear` where the release quantised (INT4)."""
    with torch.device("meta"):
        model = YuanForCausalLM(config)
        if gptq is not None:
            for name, module in list(model.named_modules()):
                if isinstance(module, nn.Linear) and QUANTIZED_LINEAR.match(name):
                    parent_name, _, child = name.rpartition(".")
                    quantized = QuantLinear(
                        module.in_features, module.out_features, gptq.group_size, bias=False, bits=gptq.bits
                    )
                    setattr(model.get_submodule(parent_name), child, quantized)
    return model


def _expected_tensors(model: nn.Module, tie_lm_head: bool) -> dict[str, tuple[torch.Size, torch.dtype]]:
    expected = {name: (t.shape, t.dtype) for name, t in model.state_dict(keep_vars=True).items()}
    if tie_lm_head:
        expected.pop("lm_head.weight", None)
    return expected


def is_gguf_path(path: str | Path) -> bool:
    """A `.gguf` file, or a folder of `.gguf` files (a byte-split set) without a config.json."""
    path = Path(path)
    if path.is_file():
        return path.suffix == ".gguf"
    return path.is_dir() and not (path / CONFIG_FILE).is_file() and any(path.glob("*.gguf"))


def is_yuan_gguf(path: str | Path) -> bool:
    """A GGUF of Yuan2-M32 (arch `yuan2_moe`), or numbered parts whose header cannot be read (the Yuan reader then
    names the problem); other GGUF files are for transformers' GGUF loader."""
    if not is_gguf_path(path):
        return False
    arch = gguf_architecture(path)
    if arch is not None:
        return arch == GGUF_ARCH
    path = Path(path)
    return path.is_dir() or GGUF_PART.match(path.name) is not None


def check_yuan_gguf(path: str | Path) -> YuanFolder:
    """`check_yuan_folder` for the vendor's GGUF files (see `gguf_yuan.py`): config from the metadata, every tensor
    mapped and checked against the model it must fill."""
    gguf_file = read_gguf(path)
    config = config_from_gguf(gguf_file)
    weights, gptq = gguf_weights(gguf_file, QUANTIZED_LINEAR)
    try:
        tie = head_is_embedding(weights)
        skeleton = build_model_skeleton(copy.deepcopy(config), gptq)
        _check_tensors(weights, _expected_tensors(skeleton, tie), gptq)
    finally:
        weights.close()
    return YuanFolder(Path(path), config, gptq, weights, tie, skeleton, gguf=gguf_file)


def check_yuan_folder(path: str | Path) -> YuanFolder:
    """Check that `path` holds a loadable Yuan2 model; raise `ModelFolderError` naming the file at fault.

    Reads config.json, quantize_config.json (INT4), the safetensors headers (whole, sharded or byte-split) and checks
    that every tensor the model needs is there with the right shape. Tensor data is not read, except to compare a
    stored lm_head with the embedding. A GGUF file or set of parts goes to `check_yuan_gguf`.
    """
    if is_gguf_path(path):
        return check_yuan_gguf(path)
    folder = Path(path)
    if not folder.is_dir():
        raise ModelFolderError(f"model folder not found: {folder}")
    config_dict = _read_config_dict(folder)
    if config_dict.get("model_type") != "yuan":
        raise ModelFolderError(f"{CONFIG_FILE}: model_type is {config_dict.get('model_type')!r}, not 'yuan'")
    if not (folder / TOKENIZER_FILE).is_file():
        raise ModelFolderError(f"missing {TOKENIZER_FILE} in {folder}")
    if (folder / TOKENIZER_FILE).stat().st_size == 0:
        raise ModelFolderError(f"{TOKENIZER_FILE} is empty")
    try:
        config = YuanConfig.from_dict(config_dict)  # the dict read above: config.json is read once
    except Exception as err:  # strict validation errors name the field
        raise ModelFolderError(f"{CONFIG_FILE}: {err}") from err
    gptq = _gptq_settings(folder, config_dict)
    weights = index_weights(folder)
    try:
        tie = bool(config.tie_word_embeddings)
        entries = weights.entries
        if tie and "lm_head.weight" in entries and "model.embed_tokens.weight" in entries:
            # The release stores both (equal). A different stored head wins over the config's default tying.
            tie = tensors_equal(entries["lm_head.weight"], entries["model.embed_tokens.weight"])
            if not tie:
                logger.info("%s: lm_head.weight differs from the embedding; loading it untied", folder)
        skeleton = build_model_skeleton(copy.deepcopy(config), gptq)  # its own config: the load settles it
        _check_tensors(weights, _expected_tensors(skeleton, tie), gptq)
    finally:
        weights.close()
    return YuanFolder(folder, config, gptq, weights, tie, skeleton)


def _check_tensors(weights: WeightIndex, expected: dict, gptq: GPTQSettings | None) -> None:
    missing = [name for name in expected if name not in weights.entries]
    if missing:
        where = ", ".join(file.name for file in weights.files)
        hint = " (is this a float checkpoint next to a quantize_config.json?)" if gptq is not None else ""
        raise ModelFolderError(
            f"{where}: missing tensor {missing[0]}"
            + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
            + hint
        )
    for name, (shape, dtype) in expected.items():
        entry = weights.entries[name]
        if entry.shape != tuple(shape):
            source = CONFIG_FILE
            if gptq is not None and name.endswith((".qweight", ".qzeros")):
                source = f"{CONFIG_FILE} with the GPTQ settings (bits {gptq.bits}, group_size {gptq.group_size})"
            raise ModelFolderError(
                f"{entry.file.name}: tensor {name} has shape {list(entry.shape)}, {source} implies {list(shape)}"
            )
        # Packed GPTQ tensors must have their exact dtypes; float weights may come in any float dtype.
        if entry.dtype != dtype and not (dtype.is_floating_point and entry.dtype.is_floating_point and
                                         not name.endswith(".scales")):
            raise ModelFolderError(f"{entry.file.name}: tensor {name} is {entry.dtype}, expected {dtype}")


def untie_differing_lm_head(model: nn.Module, path: str | Path) -> bool:
    """For models loaded by transformers' own loader, which ties lm_head to the embedding when the config says so:
    if the folder stores a *different* `lm_head.weight`, use it (untied) instead. Returns whether it did."""
    folder = Path(path)
    if not (folder.is_dir() and getattr(model.config, "tie_word_embeddings", False)):
        return False
    try:
        weights = index_weights(folder)
    except ModelFolderError:  # not safetensors (transformers read something else): nothing to compare
        return False
    try:
        head = weights.entries.get("lm_head.weight")
        embedding = weights.entries.get("model.embed_tokens.weight")
        if head is None or embedding is None or tensors_equal(head, embedding):
            return False
        current = model.get_output_embeddings().weight
        value = read_tensor(head).to(device=current.device, dtype=current.dtype)
    finally:
        weights.close()
    model.config.tie_word_embeddings = False
    model.get_output_embeddings().weight = nn.Parameter(value, requires_grad=False)
    logger.info("%s: lm_head.weight differs from the embedding; loaded it untied", folder)
    return True


# ---------------------------------------------------------------------------------------------------------------------
# Loading


def _return_freed_memory() -> None:
    """Give the C heap's free pages back to the OS. glibc keeps freed memory for reuse, so the buffers of the
    per-layer kernel conversion would stay resident: about 0.28 GB per release-sized layer, measured (6.7 GB over
    the full model). A no-op where glibc is not the allocator."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


def _materialise(
    model: nn.Module, folder: YuanFolder, device: torch.device, precision: Precision, progress: ProgressCallback | None
) -> dict[str, int]:
    """Replace every meta tensor of `model` by its stored value on `device`; returns the kernels chosen (counts)."""
    chooser = KernelChooser(device, precision.activations) if precision.kernels and folder.quantized else None
    modules = []
    for module_name, module in model.named_modules():
        tensors = []
        for kind in ("_parameters", "_buffers"):
            for attr, tensor in getattr(module, kind).items():
                full_name = f"{module_name}.{attr}" if module_name else attr
                if tensor is None or (full_name == "lm_head.weight" and folder.tie_lm_head):
                    continue
                tensors.append((kind, attr, full_name))
        if tensors:
            modules.append((module_name, module, tensors))

    total = sum(folder.weights.entries[name].nbytes for *_, tensors in modules for *_, name in tensors) or 1
    done = 0
    reported = -1.0
    decoder_layer = None
    for module_name, module, tensors in modules:
        if chooser is not None and module_name.split(".")[:3] != decoder_layer:
            decoder_layer = module_name.split(".")[:3]
            _return_freed_memory()  # once per decoder layer: what the last one's conversions freed
        for kind, attr, name in tensors:
            entry = folder.weights.entries[name]
            meta = getattr(module, kind)[attr]
            # Quantized buffers keep their stored dtypes (int32, fp16 scales); float weights take the plan's dtype.
            float_tensor = meta.dtype.is_floating_point and not isinstance(module, QuantLinear)
            target_dtype = precision.float_dtype(name) if float_tensor else meta.dtype
            if device.type == "cpu" and entry.dtype == target_dtype:
                value = read_tensor(entry)  # straight into the final storage
            else:
                value = read_tensor(entry).to(device=device, dtype=target_dtype)
            if kind == "_parameters":
                module._parameters[attr] = nn.Parameter(value, requires_grad=False)
            else:
                module._buffers[attr] = value
            done += entry.nbytes
        if chooser is not None and isinstance(module, QuantLinear):
            # Now, while only this layer's GPTQ tensors are held twice (packed and converted).
            chooser.convert(module, float32_dense=bool(ROUTER_LINEAR.search(module_name)))
        fraction = done / total
        if progress is not None and fraction - reported >= 0.01:
            reported = fraction
            progress(0.05 + 0.9 * fraction, f"Loading weights {fraction:.0%}")

    if chooser is not None:
        _return_freed_memory()
    if folder.tie_lm_head:
        model.lm_head.weight = model.model.embed_tokens.weight
    leftover = [name for name, t in model.state_dict(keep_vars=True).items() if t.is_meta]
    if leftover:
        raise ModelFolderError(f"weights did not provide {leftover[0]}")
    return chooser.counts if chooser is not None else {}


def load_yuan(
    path: str | Path | YuanFolder,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    progress: ProgressCallback | None = None,
    *,
    with_tokenizer: bool = True,
):
    """Load a Yuan2 folder and return `(model, tokenizer)` (`tokenizer` is None with `with_tokenizer=False`).

    `path` may be what `check_yuan_folder` returned, so a caller that checked first does not check twice.
    `progress(fraction, message)` is called as loading advances (fraction from 0 to 1). See the module docstring for
    the compute dtype chosen when `dtype` is None. Raises `ModelFolderError` for missing or damaged files.
    """
    from transformers import GenerationConfig

    def report(fraction: float, message: str) -> None:
        if progress is not None:
            progress(fraction, message)

    report(0.0, "Checking model folder")
    folder = path if isinstance(path, YuanFolder) else check_yuan_folder(path)
    try:
        device = torch.device(device)
        precision = resolve_precision(dtype, device, folder.quantized, folder.config.dtype)
        report(0.03, "Building the model")
        model = folder.take_skeleton() or build_model_skeleton(copy.deepcopy(folder.config), folder.gptq)
        config = model.config
        config.tie_word_embeddings = folder.tie_lm_head
        config.dtype = precision.activations
        kernels = _materialise(model, folder, device, precision, progress)
    finally:
        folder.weights.close()
    apply_precision(model, precision)
    if kernels:
        logger.info("%s: %s; GPTQ layers on %s", folder.path, precision.describe(),
                    ", ".join(f"{name} x{count}" for name, count in sorted(kernels.items())))

    model.eval()
    model.requires_grad_(False)
    model.name_or_path = str(folder.path)
    if (folder.path / GENERATION_CONFIG_FILE).is_file():
        try:
            model.generation_config = GenerationConfig.from_pretrained(str(folder.path), local_files_only=True)
        except Exception as err:
            raise ModelFolderError(f"{GENERATION_CONFIG_FILE}: {err}") from err
    tokenizer = None
    if with_tokenizer:
        report(0.96, "Loading tokenizer")
        try:
            tokenizer = _load_tokenizer(folder)
        except Exception as err:
            raise ModelFolderError(f"{TOKENIZER_FILE}: cannot be loaded ({err})") from err
        if model.generation_config.pad_token_id is None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config.eos_token_id is None:
        model.generation_config.eos_token_id = config.eos_token_id
    report(1.0, "Ready")
    return model, tokenizer


def _load_tokenizer(folder: YuanFolder):
    from .tokenization_yuan import load_yuan_tokenizer

    if folder.gguf is None:
        return load_yuan_tokenizer(folder.path)
    beside = folder.path if folder.path.is_dir() else folder.path.parent
    if (beside / TOKENIZER_FILE).is_file():  # the release's tokenizer files next to the GGUF win
        return load_yuan_tokenizer(beside)
    return tokenizer_from_gguf(folder.gguf)


def _from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
    """`YuanForCausalLM.from_pretrained`: release-layout folders (INT4 GPTQ, byte-split weight parts) load through
    `load_yuan`; others through transformers' loader, keeping a stored lm_head that differs from the embedding."""
    if not model_args and needs_native_loader(pretrained_model_name_or_path):
        device_map = kwargs.get("device_map")
        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        model, _ = load_yuan(
            pretrained_model_name_or_path,
            device=device_map if isinstance(device_map, str) and device_map != "auto" else "cpu",
            dtype=None if dtype in (None, "auto") else dtype,
            with_tokenizer=False,
        )
        return model
    model = PreTrainedModel.from_pretrained.__func__(cls, pretrained_model_name_or_path, *model_args, **kwargs)
    # transformers ties lm_head by the config default and drops a stored copy; keep it if it differs.
    untie_differing_lm_head(model, pretrained_model_name_or_path)
    return model


# The routing lives here, with the loader it routes to, so that the model file does not import the loader.
YuanForCausalLM.from_pretrained = classmethod(_from_pretrained)


__all__ = [
    "YuanFolder",
    "build_model_skeleton",
    "check_yuan_folder",
    "check_yuan_gguf",
    "is_gguf_path",
    "is_yuan_folder",
    "is_yuan_gguf",
    "load_yuan",
    "needs_native_loader",
    "untie_differing_lm_head",
]
