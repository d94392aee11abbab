"""Write a random tiny Yuan2-M32 checkpoint in the release's layout, for tests and benchmarks.

    python -m playground.models.yuan.make_tiny OUT [--int4 [--bits 8]] [--tokenizer-dir DIR] [--seed N]
        [--layers N --hidden N --heads N --projection N --experts N --top-k N --ffn N --vocab N]

The folder gets config.json (the release's field names, an `auto_map` to remote code, `use_flash_attention: true`),
generation_config.json, the tokenizer files copied from `--tokenizer-dir`, and the weights: float `model.safetensors`
(bfloat16, lm_head stored next to the tied embedding as the release does), or with `--int4` GPTQ-packed weights plus
quantize_config.json written as byte-split parts `gptq_model-4bit-128g.safetensors00/01/02` (`--bits 8`: the
INT8 release's layout, `gptq_model-8bit-128g...`).

It also writes stand-ins for the release's remote-code files that raise if anything executes them, so a test can
prove loading never runs remote code.

Shapes follow the release's structure: head_dim = projection / heads (512-wide Q/K concat per head at full size),
rotary on the first half of each head, and with `--int4` every quantized layer's input width a multiple of 128.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

from .configuration_yuan import YuanConfig
from .gptq import GPTQSettings
from .gptq_format import pack_factor, pack_gptq
from .loading import QUANTIZED_LINEAR, build_model_skeleton

TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")
INT4_WEIGHTS_NAME = "gptq_model-4bit-128g.safetensors"


def gptq_weights_name(bits: int) -> str:
    return INT4_WEIGHTS_NAME.replace("4bit", f"{bits}bit")
FLOAT_WEIGHTS_NAME = "model.safetensors"
RELEASE_EOD_ID = 77185
# Where the repository's tests find the release tokenizer: ../shared/yuan2-tokenizer next to the checkout.
DEFAULT_TOKENIZER_DIR = Path(__file__).resolve().parents[3] / ".." / "shared" / "yuan2-tokenizer"

TINY_DIMS = {
    "vocab_size": 135040,
    "hidden_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "attention_projection_size": 512,
    "num_experts": 8,
    "top_k": 2,
    "ffn_hidden_size": 128,
    "max_position_embeddings": 4096,
}

_STUB_REMOTE_CODE = (
    '"""Stand-in for the release\'s remote code: the playground must never import it."""\n'
    'raise RuntimeError("remote code from the model folder was executed")\n'
)
_TORCH_TO_SAFETENSORS = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


# ---------------------------------------------------------------------------------------------------------------------
# safetensors writing, whole or in byte-split parts


def write_safetensors(
    specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
    produce: Callable[[str], torch.Tensor],
    out_dir: Path,
    file_name: str,
    parts: int = 1,
) -> list[Path]:
    """Stream tensors into `file_name` (or `file_name00`, `01`, ... when `parts` > 1, cut like `split -b`).

    `specs` gives each tensor's name, dtype and shape up front (the header comes first); `produce(name)` returns the
    tensor when its bytes are written, so a multi-GB checkpoint never sits in memory at once.
    """
    header: dict[str, dict] = {}
    offset = 0
    for name, dtype, shape in specs:
        nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        header[name] = {"dtype": _TORCH_TO_SAFETENSORS[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)  # tensor data starts 8-byte aligned
    total = 8 + len(header_bytes) + offset

    if parts == 1:
        paths = [out_dir / file_name]
        part_size = total
    else:
        width = max(2, len(str(parts - 1)))
        paths = [out_dir / f"{file_name}{i:0{width}d}" for i in range(parts)]
        part_size = math.ceil(total / parts)
    writer = _PartWriter(paths, part_size)
    try:
        writer.write(len(header_bytes).to_bytes(8, "little"))
        writer.write(header_bytes)
        for name, dtype, shape in specs:
            tensor = produce(name)
            if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                raise ValueError(f"{name}: produced {tensor.dtype} {tuple(tensor.shape)}, declared {dtype} {shape}")
            writer.write(memoryview(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
    finally:
        writer.close()
    return paths


class _PartWriter:
    def __init__(self, paths: list[Path], part_size: int):
        self.paths, self.part_size = paths, part_size
        self.index, self.written = 0, 0
        self.handle = open(paths[0], "wb")  # noqa: SIM115 - closed in close()

    def write(self, data) -> None:
        data = memoryview(data).cast("B")
        while len(data):
            if self.written == self.part_size and self.index + 1 < len(self.paths):
                self.handle.close()
                self.index += 1
                self.handle = open(self.paths[self.index], "wb")  # noqa: SIM115
                self.written = 0
            room = self.part_size - self.written if self.index + 1 < len(self.paths) else len(data)
            chunk = data[:room]
            self.handle.write(chunk)
            self.written += len(chunk)
            data = data[len(chunk) :]

    def close(self) -> None:
        self.handle.close()
        # A split that ends early still creates every part, like `split -n`.
        for path in self.paths[self.index + 1 :]:
            path.touch()


# ---------------------------------------------------------------------------------------------------------------------
# config and folder files


def tiny_config_dict(int4: bool = False, **dims) -> dict:
    """config.json for a tiny model, with the release's field names and flags."""
    unknown = set(dims) - set(TINY_DIMS)
    if unknown:
        raise TypeError(f"unknown dimension(s): {', '.join(sorted(unknown))}")
    d = {**TINY_DIMS, **dims}
    # Small test vocabularies cannot hold the release's special ids; they use their last id instead.
    eod = RELEASE_EOD_ID if d["vocab_size"] > RELEASE_EOD_ID + 3 else d["vocab_size"] - 1
    return {
        "architectures": ["YuanForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_yuan.YuanConfig",
            "AutoModelForCausalLM": "yuan_hf_model.YuanForCausalLM",
        },
        "model_type": "yuan",
        "vocab_size": d["vocab_size"],
        "hidden_size": d["hidden_size"],
        "intermediate_size": d["ffn_hidden_size"],
        "num_hidden_layers": d["num_hidden_layers"],
        "num_attention_heads": d["num_attention_heads"],
        "attention_projection_size": d["attention_projection_size"],
        "hidden_act": "silu",
        "max_position_embeddings": d["max_position_embeddings"],
        "model_max_length": 8192,
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-6,
        "dropout": 0,
        "use_cache": True,
        "use_flash_attention": True,
        "causal_mask": True,
        "reset_attention_mask": False,
        "reset_position_ids": True,
        "use_loss_mask": False,
        "use_moe": True,
        "output_router_logits": True,
        "moe_config": {
            "moe_num_experts": d["num_experts"],
            "moe_top_k": d["top_k"],
            "ffn_hidden_size": d["ffn_hidden_size"],
            "norm_topk_prob": True,
            "gated_linear_unit": True,
            "router_type": "attn_router",
        },
        "eod_token": eod,
        "sep_token": eod + 2,
        "eod_token_id": eod,
        "sep_token_id": eod,
        "bos_token_id": eod,
        "eos_token_id": eod,
        "pad_token_id": eod,
        "mask_token_id": eod,
        "torch_dtype": "float16" if int4 else "bfloat16",
        "transformers_version": "4.30.0.dev0",
    }


def resolve_tokenizer_dir(tokenizer_dir: str | Path | None) -> Path:
    candidates = [Path(tokenizer_dir)] if tokenizer_dir else []
    if not tokenizer_dir:
        if os.environ.get("YUAN_TOKENIZER_DIR"):
            candidates.append(Path(os.environ["YUAN_TOKENIZER_DIR"]))
        candidates.append(DEFAULT_TOKENIZER_DIR)
    for candidate in candidates:
        if (candidate / "tokenizer.model").is_file():
            return candidate
    where = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(f"no Yuan tokenizer (tokenizer.model) found in {where}; pass --tokenizer-dir")


def write_folder_files(out_dir: Path, config: dict, tokenizer_dir: Path, gptq: GPTQSettings | None) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    generation = {
        "_from_model_config": True,
        "bos_token_id": config["bos_token_id"],
        "eos_token_id": config["eos_token_id"],
        "pad_token_id": config["pad_token_id"],
        "transformers_version": "4.30.0.dev0",
    }
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copyfile(tokenizer_dir / name, out_dir / name)
    for name in ("configuration_yuan.py", "yuan_hf_model.py"):
        (out_dir / name).write_text(_STUB_REMOTE_CODE, encoding="utf-8")
    if gptq is not None:
        quantize_config = {
            "bits": gptq.bits,
            "group_size": gptq.group_size,
            "damp_percent": 0.01,
            "desc_act": gptq.desc_act,
            "static_groups": False,
            "sym": gptq.sym,
            "true_sequential": True,
            "model_name_or_path": None,
            "model_file_base_name": None,
            "quant_method": "gptq",
            "checkpoint_format": gptq.checkpoint_format,
        }
        (out_dir / "quantize_config.json").write_text(json.dumps(quantize_config, indent=2) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------------------------------
# random weights


@torch.no_grad()
def random_float_model(config: YuanConfig, seed: int = 0, router_scale: float = 1.0) -> nn.Module:
    """A float32 model with random weights scaled to keep activations O(1); norms and biases are random too, so
    tests notice a bias used where a zero belongs.

    Random routers give every expert about 1/E of the weight, so the top-k choice hangs on differences of 1e-4 that
    any change of precision flips. `router_scale` multiplies the routers' value projection, spreading the router
    logits so the choice is decisive (for comparing two implementations in reduced precision)."""
    from transformers.initialization import no_init_weights

    from .modeling_yuan import YuanForCausalLM

    generator = torch.Generator().manual_seed(seed)
    with no_init_weights():  # every parameter is written below: the default init (two thirds of the time) is skipped
        model = YuanForCausalLM(config)
    model.tie_weights()  # done by the init skipped above
    for name, param in model.named_parameters():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            values = 1.0 + 0.2 * torch.randn(param.shape, generator=generator)
        elif name.endswith(".bias"):
            values = 0.2 * torch.randn(param.shape, generator=generator)
        elif param.ndim >= 2:
            fan_in = math.prod(param.shape[1:])
            # Small embeddings keep the residual stream from echoing the input token through the tied head.
            std = 0.1 if "embed_tokens" in name else 1.0 / math.sqrt(fan_in)
            values = std * torch.randn(param.shape, generator=generator)
        else:
            values = torch.randn(param.shape, generator=generator)
        if name.endswith("mlp.gate.value.weight"):
            values = values * router_scale
        param.copy_(values)
    return model.eval()


def _quantized_state(model: nn.Module, gptq: GPTQSettings) -> dict[str, torch.Tensor]:
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and QUANTIZED_LINEAR.match(name):
            qweight, qzeros, scales, g_idx = pack_gptq(module.weight, bits=gptq.bits, group_size=gptq.group_size)
            state.update({f"{name}.qweight": qweight, f"{name}.qzeros": qzeros, f"{name}.scales": scales,
                          f"{name}.g_idx": g_idx})
    return state


def make_tiny_checkpoint(
    out_dir: str | Path,
    int4: bool = False,
    tokenizer_dir: str | Path | None = None,
    seed: int = 0,
    parts: int = 3,
    bits: int = 4,
    router_scale: float = 1.0,
    **dims,
) -> Path:
    """Write a random tiny checkpoint to `out_dir` (see the module docstring); returns the folder.

    `dims` override `TINY_DIMS` (vocab_size, hidden_size, num_hidden_layers, num_attention_heads,
    attention_projection_size, num_experts, top_k, ffn_hidden_size, max_position_embeddings). `parts` is the number
    of byte-split parts of INT4 weights; `bits` 8 writes the INT8 release's layout instead (with `int4=True`);
    `router_scale`: see `random_float_model`.
    """
    out_dir = Path(out_dir)
    config_dict = tiny_config_dict(int4=int4, **dims)
    config = YuanConfig(**config_dict)
    gptq = GPTQSettings(bits=bits) if int4 else None
    if int4:
        _check_int4_dims(config, gptq)
    write_folder_files(out_dir, config_dict, resolve_tokenizer_dir(tokenizer_dir), gptq)

    model = random_float_model(config, seed, router_scale)
    if int4:
        state = _quantized_state(model, gptq)
        skeleton = build_model_skeleton(config, gptq)
        float_dtype, file_name = torch.float16, gptq_weights_name(bits)
    else:
        state, skeleton = {}, model
        float_dtype, file_name, parts = torch.bfloat16, FLOAT_WEIGHTS_NAME, 1
    floats = dict(model.state_dict())
    # The release stores lm_head next to the tied embedding.
    floats["lm_head.weight"] = floats["model.embed_tokens.weight"]
    specs = []
    for name, tensor in skeleton.state_dict(keep_vars=True).items():
        dtype = tensor.dtype if name in state else float_dtype
        specs.append((name, dtype, tuple(tensor.shape)))

    def produce(name: str) -> torch.Tensor:
        return state[name] if name in state else floats[name].to(float_dtype)

    write_safetensors(specs, produce, out_dir, file_name, parts=parts)
    return out_dir


def _check_int4_dims(config: YuanConfig, gptq: GPTQSettings) -> None:
    group_size = gptq.group_size
    widths = {
        "hidden_size": config.hidden_size,
        "attention_projection_size": config.attention_projection_size,
        "ffn_hidden_size": config.expert_hidden_size,
    }
    bad = [f"{name}={value}" for name, value in widths.items() if value % group_size]
    if config.num_experts % pack_factor(gptq.bits):
        bad.append(f"experts={config.num_experts} (router outputs are packed {pack_factor(gptq.bits)} per int32)")
    if bad:
        raise ValueError(f"INT4 needs input widths that are multiples of {group_size}: " + ", ".join(bad))


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m playground.models.yuan.make_tiny", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder to write (created)")
    parser.add_argument("--int4", action="store_true", help="GPTQ INT4 weights in byte-split parts, like the release")
    parser.add_argument("--bits", type=int, choices=(4, 8), default=4,
                        help="with --int4: 8 for the INT8 release layout")
    parser.add_argument("--tokenizer-dir", type=Path, help="folder with the release's tokenizer.model and configs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--parts", type=int, default=3, help="byte-split parts of INT4 weights (default 3)")
    parser.add_argument("--router-scale", type=float, default=1.0,
                        help="multiply the routers' value weights: decisive routing for cross-implementation checks")
    for flag, key in (("--layers", "num_hidden_layers"), ("--hidden", "hidden_size"), ("--heads", "num_attention_heads"),
                      ("--projection", "attention_projection_size"), ("--experts", "num_experts"), ("--top-k", "top_k"),
                      ("--ffn", "ffn_hidden_size"), ("--vocab", "vocab_size"), ("--max-positions", "max_position_embeddings")):
        parser.add_argument(flag, dest=key, type=int, default=TINY_DIMS[key], help=f"default {TINY_DIMS[key]}")
    args = parser.parse_args(argv)
    dims = {key: getattr(args, key) for key in TINY_DIMS}
    try:
        folder = make_tiny_checkpoint(args.out, int4=args.int4, tokenizer_dir=args.tokenizer_dir, seed=args.seed,
                                      parts=args.parts, bits=args.bits, router_scale=args.router_scale, **dims)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    print(f"wrote {folder} ({size / 1e6:.1f} MB, {f'INT{args.bits}' if args.int4 else 'float'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
