"""Write a random tiny Yuan2-M32 GGUF in the vendor's layout (its llama.cpp fork's converter), for tests and benches.

    python -m playground.models.yuan.make_tiny_gguf OUT_DIR [--q4] [--parts N] [--seed N] [--layers N ...]

With gguf-py's writer: arch `yuan2_moe`, the fork's metadata keys, its tensor names (`blk.N.attn_q`,
`blk.N.ffn_gate.E` = the whole `w1`, the router as `mlp_attn_q/k/v`, conv weights 4-D), the vocabulary as the
converter stores it (`tokenizer.ggml.*` from the release's tokenizer.model, padded to the embedding's rows with
user-defined `<dummyNNNNN>` entries). Types as the fork's converter and its `quantize q4_0` leave them: F16 for
every 2-D/4-D tensor and F32 for 1-D ones; with `--q4` every 2-D weight Q4_0 except `output`, which is Q6_K (random
valid Q6_K blocks: gguf-py cannot quantize to Q6_K), and conv weights stay F16. `--parts N` cuts the file into raw
numbered parts like the release (`NAME-00.gguf`, ...; only the first starts with the GGUF magic).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from .configuration_yuan import YuanConfig
from .gguf_yuan import ARCH, GGUF_PART, native_name
from .make_tiny import TINY_DIMS, random_float_model, resolve_tokenizer_dir, tiny_config_dict

Q6_K_BLOCK = 256


def vocabulary(tokenizer_dir: Path, vocab_size: int) -> tuple[list[str], list[float], list[int]]:
    """Pieces, scores and types as the fork's converter writes them, padded to `vocab_size` entries."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))
    tokens, scores, types = [], [], []
    for index in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(index))
        scores.append(sp.get_score(index))
        # gguf token types: NORMAL 1, UNKNOWN 2, CONTROL 3, USER_DEFINED 4, UNUSED 5, BYTE 6
        types.append(2 if sp.is_unknown(index) else 3 if sp.is_control(index) else 5 if sp.is_unused(index)
                     else 6 if sp.is_byte(index) else 1)
    for index in range(vocab_size - len(tokens)):
        tokens.append(f"<dummy{index + 1:05d}>")
        scores.append(-1000.0)
        types.append(4)
    return tokens, scores, types


def _q6_k_blocks(rows: int, columns: int, generator: torch.Generator) -> np.ndarray:
    """Random valid Q6_K data [rows, columns / 256 * 210] (ql, qh, int8 scales, fp16 d): finite, O(0.1) values."""
    blocks = rows * columns // Q6_K_BLOCK
    data = torch.randint(0, 256, (blocks, 210), generator=generator, dtype=torch.uint8)
    data[:, 192:208] = torch.randint(-32, 32, (blocks, 16), generator=generator, dtype=torch.int8).view(torch.uint8)
    d = torch.full((blocks, 1), 1.0 / 1024, dtype=torch.float16)
    data[:, 208:210] = d.view(torch.uint8)
    return data.numpy().reshape(rows, -1)


def gguf_writer(path: Path, config: YuanConfig, tokenizer_dir: Path, q4: bool, arch: str = ARCH):
    """A gguf-py writer for `path` with the fork's metadata and vocabulary for `config` (tensors still to add)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(ARCH)
    writer.add_file_type(2 if q4 else 1)  # MostlyQ4_0 / MostlyF16
    if q4:
        writer.add_quantization_version(2)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.expert_hidden_size)
    writer.add_rope_dimension_count(config.rotary_dims)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_attention_heads)
    writer.add_expert_count(config.num_experts)
    writer.add_expert_used_count(config.num_experts_per_tok)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    tokens, scores, token_types = vocabulary(tokenizer_dir, config.vocab_size)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(token_types)
    for key in ("bos", "eos", "sep", "pad"):  # the fork's converter took them all from config.json: <eod>
        getattr(writer, f"add_{key}_token_id")(77185)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(True)
    return writer


def write_tiny_gguf(path: Path, config: YuanConfig, model: torch.nn.Module, tokenizer_dir: Path,
                    q4: bool = False, seed: int = 0, arch: str = ARCH, drop: Iterable[str] = (),
                    types: dict[str, int] | None = None) -> Path:
    """One GGUF file at `path` holding `model`'s weights in the vendor's layout.

    For tests of bad files: `arch` another architecture, `drop` GGUF tensor names left out, `types` GGUF tensor
    name -> ggml type (quantized with gguf.quants) instead of the vendor's choice."""
    import gguf

    drop, types = set(drop), types or {}
    writer = gguf_writer(path, config, tokenizer_dir, q4=q4, arch=arch)

    generator = torch.Generator().manual_seed(seed + 1)
    by_native = {}
    for gguf_tensor in _gguf_names(config):
        by_native[native_name(gguf_tensor)] = gguf_tensor
    state = model.state_dict()
    state["lm_head.weight"] = state["model.embed_tokens.weight"]  # the converter stores the tied head as `output`
    for native, tensor_name in by_native.items():
        if tensor_name in drop:
            continue
        # bf16 first, as the vendor converted a bf16 state dict; then the types the converter and quantize choose.
        value = state[native].detach().to(torch.bfloat16).to(torch.float32).numpy()
        if tensor_name in types:
            kind = gguf.GGMLQuantizationType(types[tensor_name])
            writer.add_tensor(tensor_name, gguf.quants.quantize(value, kind), raw_dtype=kind)
        elif value.ndim == 1:
            writer.add_tensor(tensor_name, value.astype(np.float32))
        elif q4 and tensor_name == "output.weight":
            blocks = _q6_k_blocks(value.shape[0], value.shape[1], generator)
            writer.add_tensor(tensor_name, blocks, raw_dtype=gguf.GGMLQuantizationType.Q6_K)
        elif q4 and value.ndim == 2:
            quantized = gguf.quants.quantize(value, gguf.GGMLQuantizationType.Q4_0)
            writer.add_tensor(tensor_name, quantized, raw_dtype=gguf.GGMLQuantizationType.Q4_0)
        else:
            writer.add_tensor(tensor_name, value.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _gguf_names(config: YuanConfig) -> Iterable[str]:
    """The fork's tensor names, in its (state-dict) order."""
    yield "token_embd.weight"
    for layer in range(config.num_hidden_layers):
        block = f"blk.{layer}."
        yield from (block + n for n in ("attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight",
                                        "attn_output.weight", "conv1.weight", "conv1.bias", "conv2.weight",
                                        "conv2.bias", "lf_output_norm.weight", "mlp_attn_q.weight",
                                        "mlp_attn_k.weight", "mlp_attn_v.weight"))
        for expert in range(config.num_experts):
            yield f"{block}ffn_gate.{expert}.weight"
            yield f"{block}ffn_down.{expert}.weight"
        yield block + "ffn_norm.weight"
    yield "output_norm.weight"
    yield "output.weight"


def split_into_parts(path: Path, parts: int) -> list[Path]:
    """Cut `path` into `parts` raw chunks named like the release's (`NAME-00.gguf`, ...), as `split -b` would."""
    data_size = path.stat().st_size
    chunk = math.ceil(data_size / parts)
    width = max(2, len(str(parts - 1)))
    stem = path.name[: -len(".gguf")]
    written = []
    with open(path, "rb") as source:
        for index in range(parts):
            target = path.with_name(f"{stem}-{index:0{width}d}.gguf")
            assert GGUF_PART.match(target.name)
            target.write_bytes(source.read(chunk))
            written.append(target)
    path.unlink()
    return written


def make_tiny_gguf(out_dir: str | Path, q4: bool = False, parts: int = 1, seed: int = 0,
                   tokenizer_dir: str | Path | None = None, arch: str = ARCH, drop: Iterable[str] = (),
                   types: dict[str, int] | None = None, **dims) -> list[Path]:
    """Write `out_dir/tiny-yuan[-q4_0].gguf` (or its parts); returns the files. The weights are those of
    `make_tiny.random_float_model(config, seed)` for the same dims, so a make_tiny folder is their float twin.
    `arch`, `drop`, `types`: see `write_tiny_gguf`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = YuanConfig(**tiny_config_dict(**dims))
    model = random_float_model(config, seed)
    path = write_tiny_gguf(out_dir / f"tiny-yuan{'-q4_0' if q4 else ''}.gguf", config, model,
                           resolve_tokenizer_dir(tokenizer_dir), q4=q4, seed=seed, arch=arch, drop=drop, types=types)
    return split_into_parts(path, parts) if parts > 1 else [path]


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m playground.models.yuan.make_tiny_gguf",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--q4", action="store_true", help="Q4_0 weights and a Q6_K output, like the INT4 release")
    parser.add_argument("--parts", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer-dir", type=Path)
    parser.add_argument("--layers", dest="num_hidden_layers", type=int, default=TINY_DIMS["num_hidden_layers"])
    args = parser.parse_args(argv)
    files = make_tiny_gguf(args.out, q4=args.q4, parts=args.parts, seed=args.seed, tokenizer_dir=args.tokenizer_dir,
                           num_hidden_layers=args.num_hidden_layers)
    print("wrote " + ", ".join(str(f) for f in files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
