"""The vendor's GGUF files of Yuan2-M32 (`Yuan2-M32-GGUF`, f16, and `Yuan2-M32-GGUF-INT4`), read in place.

The vendor's llama.cpp fork (arch `yuan2_moe`) is the only runtime that knew these files; `../shared/docs/
yuan2-m32-gguf.md` says how they store the model. What this module does with them:

- **Files.** One `.gguf`, the first part of a byte-split set (`Yuan2-moe_0526-000.gguf`, `-001`, ...: raw chunks of
  one file, only the first starting with the GGUF magic), or a folder holding one set. Parts are read in place
  through `PartedFile`, as the release's byte-split safetensors are: nothing is joined, nothing copied whole.
- **Header.** Parsed here (gguf-py's `GGUFReader` maps one file, not a set of parts), with gguf-py's type tables.
- **Weights.** Every tensor maps onto a native state-dict name (the fork wrote HF's tensors unchanged: no transpose,
  no rotary permute; `ffn_gate.E` is the whole `w1`). F16/F32 tensors are read as they are. Q4_0 linears (a
  symmetric 4-bit block of 32 with an fp16 scale, `w = (q - 8) * d`) are repacked, not requantised, into GPTQ v1
  tensors with group size 32, so they run on the same int4 kernels as the GPTQ release and the same exact path
  (`dtype=torch.float32`); the router among them is computed in fp32 from its once-dequantised weight, as for GPTQ.
  `token_embd` and `output` (Q4_0 and Q6_K in the INT4 file) are dequantised once with `gguf.quants`. Any other
  ggml type on a linear is refused by name.
- **Config** from the metadata, with the head size from `attn_q`'s shape; **tokenizer** from `tokenizer.ggml.*`
  (`tokenizer_from_gguf`), unless the release's tokenizer files lie beside the GGUF.
"""

from __future__ import annotations

import re
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from playground.errors import ModelFolderError

from .configuration_yuan import YuanConfig
from .gptq import GPTQSettings
from .safetensors_parts import PartedFile, TensorEntry, WeightIndex, ordered_parts, tensors_equal

ARCH = "yuan2_moe"
MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
Q4_0_GROUP = 32
# `Yuan2-moe_0526-000.gguf`, `Yuan2-moe_0526_int4-00.gguf`: numbered raw parts of one file.
GGUF_PART = re.compile(r"^(?P<stem>.+)-(?P<number>\d{2,})\.gguf$")

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "conv1.weight": "self_attn.lf_gate.conv1.weight",
    "conv1.bias": "self_attn.lf_gate.conv1.bias",
    "conv2.weight": "self_attn.lf_gate.conv2.weight",
    "conv2.bias": "self_attn.lf_gate.conv2.bias",
    "lf_output_norm.weight": "self_attn.lf_gate.output_layernorm.weight",
    "mlp_attn_q.weight": "mlp.gate.query.weight",
    "mlp_attn_k.weight": "mlp.gate.key.weight",
    "mlp_attn_v.weight": "mlp.gate.value.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_BLOCK_TENSOR = re.compile(r"^blk\.(?P<layer>\d+)\.(?P<rest>.+)$")
_EXPERT_TENSOR = re.compile(r"^ffn_(?P<kind>gate|down)\.(?P<expert>\d+)\.weight$")
_PLAIN_TYPES = {0: torch.float32, 1: torch.float16}  # ggml F32, F16


# ---------------------------------------------------------------------------------------------------------------------
# Files and header


def find_gguf_parts(path: str | Path) -> list[Path]:
    """The files that make up one GGUF: a single file, or every numbered part of the set `path` names."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix == ".gguf" and p.is_file())
        stems = {GGUF_PART.match(p.name).group("stem") if GGUF_PART.match(p.name) else p.name for p in files}
        if len(stems) != 1:
            found = ", ".join(p.name for p in files) or "none"
            raise ModelFolderError(f"{path} should hold one GGUF model (a file or its numbered parts); found {found}")
        path = files[0]
    if not path.is_file():
        raise ModelFolderError(f"GGUF file not found: {path}")
    match = GGUF_PART.match(path.name)
    if match is None:
        return [path]
    stem, width = match.group("stem"), len(match.group("number"))
    numbered = [(int(m.group("number")), p) for p in path.parent.iterdir()
                if (m := GGUF_PART.match(p.name)) and m.group("stem") == stem]
    return ordered_parts(numbered, lambda n: f"GGUF part {stem}-{n:0{width}d}.gguf")


@dataclass
class GGUFTensor:
    name: str
    ggml_type: int
    shape: tuple[int, ...]  # torch order (ggml's ne reversed)
    offset: int  # absolute, in the (virtual) file
    nbytes: int

    @property
    def type_name(self) -> str:
        from gguf import GGMLQuantizationType

        try:
            return GGMLQuantizationType(self.ggml_type).name
        except ValueError:
            return f"ggml type {self.ggml_type}"


class _Cursor:
    """Sequential reads over a PartedFile with a read-ahead buffer (the header holds ~135k vocabulary strings)."""

    def __init__(self, file: PartedFile, chunk: int = 4 << 20):
        self.file, self.chunk = file, chunk
        self.position, self._start, self._buffer = 0, 0, b""

    def take(self, count: int) -> bytes:
        end = self.position + count
        if end > self.file.size:
            raise ModelFolderError(f"{self.file.name}: the GGUF header ends early (at byte {self.file.size})")
        if not (self._start <= self.position and end <= self._start + len(self._buffer)):
            self._start = self.position
            self._buffer = self.file.read(self.position, min(max(count, self.chunk), self.file.size - self.position))
        data = self._buffer[self.position - self._start : end - self._start]
        self.position = end
        return data

    def unpack(self, fmt: str) -> Any:
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt)))[0]

    def string(self) -> str:
        return self.take(self.unpack("Q")).decode("utf-8", errors="replace")


_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


def _value(cursor: _Cursor, value_type: int) -> Any:
    if value_type in _SCALAR_FORMATS:
        return cursor.unpack(_SCALAR_FORMATS[value_type])
    if value_type == _STRING:
        return cursor.string()
    if value_type == _ARRAY:
        item_type, count = cursor.unpack("I"), cursor.unpack("Q")
        if item_type in _SCALAR_FORMATS and item_type != 7:
            fmt = _SCALAR_FORMATS[item_type]
            return np.frombuffer(cursor.take(count * struct.calcsize(fmt)), dtype="<" + fmt).tolist()
        return [_value(cursor, item_type) for _ in range(count)]
    raise ModelFolderError(f"{cursor.file.name}: unknown GGUF value type {value_type}")


def gguf_architecture(path: str | Path) -> str | None:
    """`general.architecture` of a GGUF, read from the start of its first file without parsing the rest (writers put
    it first); None when the file is not readable as GGUF."""
    try:
        first = find_gguf_parts(path)[0]
        file = PartedFile([first])
        try:
            cursor = _Cursor(file, chunk=1 << 16)
            if cursor.take(4) != MAGIC:
                return None
            cursor.unpack("I"), cursor.unpack("Q")
            for _ in range(cursor.unpack("Q")):
                key, value = cursor.string(), _value(cursor, cursor.unpack("I"))
                if key == "general.architecture":
                    return value
        finally:
            file.close()
    except (ModelFolderError, OSError, struct.error, UnicodeDecodeError):
        return None
    return None


def gguf_model_name(gguf_file: "GGUFFile") -> str:
    """How the model is named in the UI: the file's stem, without a part number."""
    first = gguf_file.file.paths[0]
    match = GGUF_PART.match(first.name)
    return match.group("stem") if match else first.stem


@dataclass
class GGUFFile:
    file: PartedFile
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensor]

    def close(self) -> None:
        self.file.close()


def read_gguf(path: str | Path) -> GGUFFile:
    """The header (metadata and tensor table) of a GGUF file or set of parts; tensor data is not read."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    file = PartedFile(find_gguf_parts(path))
    name = file.paths[0].name
    cursor = _Cursor(file)
    try:
        if file.size < 24 or file.read(0, 4) != MAGIC:
            raise ModelFolderError(f"{name} is not a GGUF file (no GGUF magic at its start)")
        cursor.take(4)
        version, tensor_count, kv_count = cursor.unpack("I"), cursor.unpack("Q"), cursor.unpack("Q")
        if version not in (2, 3):
            raise ModelFolderError(f"{name}: GGUF version {version} is not supported (2 and 3 are)")
        metadata = {}
        for _ in range(kv_count):
            key = cursor.string()
            metadata[key] = _value(cursor, cursor.unpack("I"))
        infos = []
        for _ in range(tensor_count):
            tensor_name = cursor.string()
            dims = [cursor.unpack("Q") for _ in range(cursor.unpack("I"))]
            infos.append((tensor_name, dims, cursor.unpack("I"), cursor.unpack("Q")))
        alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
        data_start = -(-cursor.position // alignment) * alignment
        tensors = {}
        for tensor_name, dims, ggml_type, offset in infos:
            try:
                block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
            except (ValueError, KeyError):
                raise ModelFolderError(f"{name}: tensor {tensor_name} has an unknown ggml type {ggml_type}") from None
            elements = int(np.prod(dims)) if dims else 1
            if dims and dims[0] % block:
                raise ModelFolderError(f"{name}: tensor {tensor_name} rows of {dims[0]} do not fill blocks of {block}")
            nbytes = elements // block * block_bytes
            tensors[tensor_name] = GGUFTensor(tensor_name, ggml_type, tuple(reversed(dims)), data_start + offset, nbytes)
        needed = max((t.offset + t.nbytes for t in tensors.values()), default=data_start)
        if needed > file.size:
            raise ModelFolderError(f"{file.paths[-1].name} is truncated: the GGUF needs {needed} bytes, "
                                   f"its {len(file.paths)} part(s) hold {file.size}")
    finally:
        file.close()
    return GGUFFile(file, metadata, tensors)


# ---------------------------------------------------------------------------------------------------------------------
# Config


def config_from_gguf(gguf_file: GGUFFile) -> YuanConfig:
    """The native config from the metadata and the tensor shapes; refuses an arch or a shape it does not know."""
    meta, name = gguf_file.metadata, gguf_file.file.paths[0].name
    arch = meta.get("general.architecture")
    if arch != ARCH:
        raise ModelFolderError(f"{name}: architecture {arch!r} is not Yuan2-M32's GGUF ({ARCH!r})")

    def field(key: str, default: Any = None) -> Any:
        value = meta.get(f"{ARCH}.{key}", default)
        if value is None:
            raise ModelFolderError(f"{name}: metadata {ARCH}.{key} is missing")
        return value

    heads = int(field("attention.head_count"))
    if int(field("attention.head_count_kv", heads)) != heads:
        raise ModelFolderError(f"{name}: grouped key/value heads are not Yuan2-M32's layout")
    query = gguf_file.tensors.get("blk.0.attn_q.weight")
    embedding = gguf_file.tensors.get("token_embd.weight")
    if query is None or embedding is None:
        raise ModelFolderError(f"{name}: missing tensor {'blk.0.attn_q.weight' if query is None else 'token_embd.weight'}")
    hidden = int(field("embedding_length"))
    try:
        return YuanConfig(
            vocab_size=embedding.shape[0],
            hidden_size=hidden,
            intermediate_size=int(field("feed_forward_length")),
            num_hidden_layers=int(field("block_count")),
            num_attention_heads=heads,
            attention_projection_size=query.shape[0],  # head_dim = rows / heads (256 in M32; not in the metadata)
            max_position_embeddings=int(field("context_length")),
            rms_norm_eps=float(field("attention.layer_norm_rms_epsilon")),
            rotary_dim=int(field("rope.dimension_count", hidden // heads)),
            rotary_base=float(meta.get(f"{ARCH}.rope.freq_base", 10000.0)),
            moe_config={"moe_num_experts": int(field("expert_count")), "moe_top_k": int(field("expert_used_count")),
                        "ffn_hidden_size": int(field("feed_forward_length"))},
        )
    except ModelFolderError:
        raise
    except Exception as err:
        raise ModelFolderError(f"{name}: metadata gives no valid Yuan2 config ({err})") from err


def native_name(gguf_name: str) -> str | None:
    """The native state-dict name of a GGUF tensor (None: not Yuan2's)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _BLOCK_TENSOR.match(gguf_name)
    if match is None:
        return None
    layer, rest = match.group("layer"), match.group("rest")
    expert = _EXPERT_TENSOR.match(rest)
    if expert is not None:
        linear = "w1" if expert.group("kind") == "gate" else "w2"
        return f"model.layers.{layer}.mlp.experts.{expert.group('expert')}.{linear}.weight"
    suffix = _LAYER_NAMES.get(rest)
    return f"model.layers.{layer}.{suffix}" if suffix else None


# ---------------------------------------------------------------------------------------------------------------------
# Weights: entries that `_materialise` reads like stored safetensors


@dataclass
class _Q4Blocks:
    """A Q4_0 linear [out, in] as GPTQ v1 tensors with group size 32: qweight, qzeros, scales, g_idx."""

    tensor: GGUFTensor
    file: PartedFile
    _cache: tuple[torch.Tensor, torch.Tensor] | None = None
    _read: frozenset = frozenset()

    def packed_and_scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        """GPTQ's `qweight` [in/8, out] (int32) and `scales` [in/32, out] (fp16), read once per linear.

        A Q4_0 block holds elements 0-15 in its 16 bytes' low nibbles and 16-31 in their high nibbles; GPTQ packs 8
        consecutive input elements per int32, element k in bits 4k. Pairing the elements into bytes (even one low,
        odd one high) and reading 4 bytes as a little-endian int32 gives exactly that, with byte operations only.
        """
        if self._cache is None:
            out_features, in_features = self.tensor.shape
            raw = torch.empty(self.tensor.nbytes, dtype=torch.uint8)
            self.file.readinto(self.tensor.offset, memoryview(raw.numpy()))
            blocks = raw.view(out_features, in_features // Q4_0_GROUP, 18)
            scales = blocks[..., :2].contiguous().view(torch.float16).squeeze(-1)  # [out, groups]
            nibbles = blocks[..., 2:]
            elements = torch.cat((nibbles & 0xF, nibbles >> 4), dim=-1)  # [out, groups, 32] in input order
            paired = elements[..., 0::2] | (elements[..., 1::2] << 4)
            packed = paired.contiguous().view(torch.int32).view(out_features, in_features // 8)
            self._cache = packed.t().contiguous(), scales.t().contiguous()
        return self._cache

    def done(self, part: str) -> None:
        """`part` (qweight or scales) has been read; once both have, the unpacked values are let go."""
        self._read = self._read | {part}
        if self._read >= {"qweight", "scales"}:
            self._cache, self._read = None, frozenset()


@dataclass
class _Q4Entry:
    """One of a Q4_0 linear's GPTQ tensors, read on demand."""

    blocks: _Q4Blocks
    part: str  # qweight, qzeros, scales, g_idx
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int

    @property
    def file(self) -> PartedFile:
        return self.blocks.file

    def read(self, out: torch.Tensor | None = None) -> torch.Tensor:
        in_features = self.blocks.tensor.shape[1]
        if self.part == "g_idx":
            value = (torch.arange(in_features) // Q4_0_GROUP).to(torch.int32)
        elif self.part == "qzeros":
            # Q4_0's zero is 8 for every group; GPTQ v1 stores zero - 1 in each nibble.
            value = torch.full(self.shape, 0x77777777, dtype=torch.int32)
        elif self.part == "scales":
            value = self.blocks.packed_and_scales()[1]
            self.blocks.done("scales")
        else:
            value = self.blocks.packed_and_scales()[0]
            self.blocks.done("qweight")
        return value if out is None else out.copy_(value)


@dataclass
class _DequantizedEntry:
    """A quantized non-linear tensor (the embedding, the head) dequantised once with gguf.quants, as float32."""

    tensor: GGUFTensor
    file: PartedFile
    dtype: torch.dtype = torch.float32

    @property
    def shape(self) -> tuple[int, ...]:
        return self.tensor.shape

    @property
    def nbytes(self) -> int:
        return self.tensor.nbytes

    def read(self, out: torch.Tensor | None = None) -> torch.Tensor:
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        raw = np.empty(self.tensor.nbytes, dtype=np.uint8)
        self.file.readinto(self.tensor.offset, memoryview(raw))
        rows = raw.reshape(self.tensor.shape[0], -1)
        value = torch.from_numpy(dequantize(rows, GGMLQuantizationType(self.tensor.ggml_type)).astype(np.float32))
        return value if out is None else out.copy_(value)


def gguf_weights(gguf_file: GGUFFile, quantized_linear: re.Pattern) -> tuple[WeightIndex, GPTQSettings | None]:
    """Entries for every tensor under its native name (read by `loading._materialise` like stored safetensors), and
    the GPTQ settings the Q4_0 linears take (None: a float file)."""
    from gguf import GGMLQuantizationType

    file, name = gguf_file.file, gguf_file.file.paths[0].name
    entries: dict[str, Any] = {}
    q4_linears, float_linears = [], []
    for tensor in gguf_file.tensors.values():
        target = native_name(tensor.name)
        if target is None:
            raise ModelFolderError(f"{name}: tensor {tensor.name} is not part of Yuan2-M32's GGUF layout")
        module = target.rpartition(".")[0]
        if tensor.ggml_type in _PLAIN_TYPES:
            dtype = _PLAIN_TYPES[tensor.ggml_type]
            entries[target] = TensorEntry(file, dtype, tensor.shape, tensor.offset, tensor.nbytes)
            if quantized_linear.match(module):
                float_linears.append(tensor.name)
        elif tensor.ggml_type == GGMLQuantizationType.Q4_0 and quantized_linear.match(module):
            out_features, in_features = tensor.shape
            blocks = _Q4Blocks(tensor, file)
            groups = in_features // Q4_0_GROUP
            for part, dtype, shape in (("scales", torch.float16, (groups, out_features)),
                                       ("qweight", torch.int32, (in_features // 8, out_features)),
                                       ("qzeros", torch.int32, (groups, out_features // 8)),
                                       ("g_idx", torch.int32, (in_features,))):
                size = int(np.prod(shape)) * torch.empty(0, dtype=dtype).element_size()
                entries[f"{module}.{part}"] = _Q4Entry(blocks, part, dtype, shape, size)
            q4_linears.append(tensor.name)
        elif target in ("model.embed_tokens.weight", "lm_head.weight"):
            entries[target] = _DequantizedEntry(tensor, file)
        else:
            raise ModelFolderError(
                f"{name}: tensor {tensor.name} is {tensor.type_name}; this reader takes F16/F32 tensors, Q4_0 linears "
                "(on the int4 kernels) and any type for token_embd/output")
    if q4_linears and float_linears:
        raise ModelFolderError(f"{name}: tensor {float_linears[0]} is float where the other linears are Q4_0 "
                               f"(e.g. {q4_linears[0]}); a mixed file is not supported")
    gptq = GPTQSettings(bits=4, group_size=Q4_0_GROUP, sym=True, desc_act=False) if q4_linears else None
    return WeightIndex([file], entries), gptq


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer

_USER_DEFINED = 4  # GGUF token types are sentencepiece's piece types (NORMAL 1, UNKNOWN 2, CONTROL 3, ...)


def tokenizer_from_gguf(gguf_file: GGUFFile):
    """The release's tokenizer rebuilt from `tokenizer.ggml.*`: the sentencepiece model the fork's converter read
    (pieces, scores, types) with the release's normaliser and trainer settings, then `YuanTokenizer` on it (no BOS,
    `<eod>` the end, the release's special tokens added as the release adds them)."""
    from sentencepiece import sentencepiece_model_pb2

    from .tokenization_yuan import YuanTokenizer

    meta, name = gguf_file.metadata, gguf_file.file.paths[0].name
    if meta.get("tokenizer.ggml.model") != "llama":
        raise ModelFolderError(f"{name}: tokenizer.ggml.model is {meta.get('tokenizer.ggml.model')!r}; Yuan2's is "
                               "a sentencepiece vocabulary ('llama')")
    tokens = meta.get("tokenizer.ggml.tokens") or []
    scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if not tokens or not len(tokens) == len(scores) == len(types):
        raise ModelFolderError(f"{name}: tokenizer.ggml.tokens, scores and token_type do not describe one vocabulary")
    # The converter padded the list to the embedding's rows with user-defined entries; the model ends before them.
    count = len(tokens)
    while count and types[count - 1] == _USER_DEFINED:
        count -= 1
    model = sentencepiece_model_pb2.ModelProto()
    model.trainer_spec.model_type = sentencepiece_model_pb2.TrainerSpec.BPE
    model.trainer_spec.byte_fallback = True
    model.trainer_spec.split_digits = True
    model.trainer_spec.allow_whitespace_only_pieces = True
    model.trainer_spec.unk_id, model.trainer_spec.bos_id, model.trainer_spec.eos_id, model.trainer_spec.pad_id = 0, 1, 2, -1
    model.normalizer_spec.name = "identity"
    model.normalizer_spec.add_dummy_prefix = True
    model.normalizer_spec.remove_extra_whitespaces = False
    for piece, score, piece_type in zip(tokens[:count], scores[:count], types[:count]):
        model.pieces.add(piece=piece, score=score, type=piece_type)
    # YuanTokenizer reads a file; this one lives as long as the process needs it (a few MB in the temp folder).
    folder = Path(tempfile.mkdtemp(prefix="yuan-gguf-tokenizer-"))
    (folder / "tokenizer.model").write_bytes(model.SerializeToString())
    return YuanTokenizer(vocab_file=str(folder / "tokenizer.model"))


def head_is_embedding(weights: WeightIndex) -> bool:
    """The fork stores `output` next to `token_embd`: tie them when the stored copies are the same bytes."""
    head, embedding = weights.entries.get("lm_head.weight"), weights.entries.get("model.embed_tokens.weight")
    if head is None:
        return True
    return isinstance(head, TensorEntry) and isinstance(embedding, TensorEntry) and tensors_equal(head, embedding)


__all__ = ["ARCH", "GGUFFile", "GGUFTensor", "config_from_gguf", "find_gguf_parts", "gguf_architecture",
           "gguf_model_name", "gguf_weights", "head_is_embedding", "native_name", "read_gguf", "tokenizer_from_gguf"]
