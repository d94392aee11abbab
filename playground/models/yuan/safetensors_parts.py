"""Reading safetensors files in place, whole, sharded (`model.safetensors.index.json`) or byte-split into parts
(`gptq_model-4bit-128g.safetensors00`, `01`, `02`, as the release ships them).

The safetensors header (8-byte little-endian length, then JSON) and every tensor's byte range may straddle part
boundaries, so a small virtual file maps offsets onto the parts; nothing is joined on disk. Every inconsistency
raises `ModelFolderError` naming the file.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

try:
    from playground.errors import ModelFolderError
except ImportError:  # in the vLLM plugin (vllm_yuan/), which ships this file without the playground

    class ModelFolderError(ValueError):
        """A model folder is missing, incomplete or corrupt. The message names the file at fault."""

INDEX_FILE = "model.safetensors.index.json"
SPLIT_PART = re.compile(r"^(?P<stem>.+\.safetensors)(?P<number>\d{2,})$")

_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_MAX_HEADER_BYTES = 100 * 1024 * 1024
_COMPARE_CHUNK_BYTES = 64 * 1024 * 1024


class PartedFile:
    """Read-only random access over files that, concatenated, form one file (or over a single file)."""

    def __init__(self, paths: list[Path]):
        self.paths = paths
        self.sizes = [path.stat().st_size for path in paths]
        self.starts = [sum(self.sizes[:i]) for i in range(len(paths))]
        self.size = sum(self.sizes)
        self._handles: list = [None] * len(paths)

    @property
    def name(self) -> str:
        """How messages refer to this file: `a.safetensors`, `a.safetensors00..02`, `a-00.gguf..a-02.gguf`."""
        if len(self.paths) == 1:
            return self.paths[0].name
        split = SPLIT_PART.match(self.paths[-1].name)
        return f"{self.paths[0].name}..{split.group('number') if split else self.paths[-1].name}"

    def readinto(self, offset: int, buffer: memoryview) -> None:
        """Fill `buffer` with the bytes at `offset`, crossing part boundaries as needed."""
        wanted = len(buffer)
        if offset + wanted > self.size:
            raise ModelFolderError(
                f"{self.paths[-1].name} is truncated: the weights need {offset + wanted} bytes but "
                f"{self.name} holds {self.size}"
            )
        filled = 0
        part = max(i for i, start in enumerate(self.starts) if start <= offset)
        while filled < wanted:
            local = offset + filled - self.starts[part]
            count = min(wanted - filled, self.sizes[part] - local)
            handle = self._handle(part)
            handle.seek(local)
            view = buffer[filled : filled + count]
            got = 0
            while got < count:
                n = handle.readinto(view[got:])
                if not n:
                    raise ModelFolderError(f"{self.paths[part].name} is truncated (it shrank while being read)")
                got += n
            filled += count
            part += 1

    def read(self, offset: int, length: int) -> bytes:
        buffer = bytearray(length)
        self.readinto(offset, memoryview(buffer))
        return bytes(buffer)

    def _handle(self, part: int):
        if self._handles[part] is None:
            self._handles[part] = open(self.paths[part], "rb")  # noqa: SIM115 - closed in close()
        return self._handles[part]

    def close(self) -> None:
        for i, handle in enumerate(self._handles):
            if handle is not None:
                handle.close()
                self._handles[i] = None


@dataclass
class TensorEntry:
    """A stored tensor's bytes. Other entry kinds (the GGUF reader's repacked or dequantised tensors) have the same
    fields and `read`, so the loader reads them all alike."""

    file: PartedFile
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the (virtual) file
    nbytes: int

    def read(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor's bytes read into `out` (a CPU tensor of the same dtype and size) or into a new tensor."""
        if out is None:
            out = torch.empty(self.shape, dtype=self.dtype)
        if self.nbytes:
            self.file.readinto(self.offset, memoryview(out.reshape(-1).view(torch.uint8).numpy()))
        return out


def _read_safetensors_header(file: PartedFile) -> dict[str, TensorEntry]:
    """Tensor entries of a safetensors file; every inconsistency raises `ModelFolderError` naming the file."""
    if file.size < 8:
        raise ModelFolderError(f"{file.name}: too short to be a safetensors file ({file.size} bytes)")
    header_length = int.from_bytes(file.read(0, 8), "little")
    if header_length <= 0 or header_length > _MAX_HEADER_BYTES:
        raise ModelFolderError(f"{file.name}: safetensors header does not parse (header length {header_length})")
    if 8 + header_length > file.size:
        raise ModelFolderError(f"{file.name}: safetensors header does not parse (the file ends inside the header)")
    try:
        header = json.loads(file.read(8, header_length).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelFolderError(f"{file.name}: safetensors header does not parse ({err})") from err
    if not isinstance(header, dict):
        raise ModelFolderError(f"{file.name}: safetensors header does not parse (not a JSON object)")

    data_start = 8 + header_length
    entries: dict[str, TensorEntry] = {}
    needed = data_start
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _SAFETENSORS_DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(v) for v in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as err:
            raise ModelFolderError(f"{file.name}: safetensors header has a bad entry for {name!r}") from err
        expected = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        if end - begin != expected or begin < 0:
            raise ModelFolderError(
                f"{file.name}: safetensors header has a bad entry for {name!r} ({end - begin} bytes for shape {shape})"
            )
        entries[name] = TensorEntry(file, dtype, shape, data_start + begin, expected)
        needed = max(needed, data_start + end)
    if needed > file.size:
        raise ModelFolderError(
            f"{file.paths[-1].name} is truncated: {file.name} holds {file.size} bytes, its header needs {needed}"
        )
    return entries


def read_tensor(entry: TensorEntry, out: torch.Tensor | None = None) -> torch.Tensor:
    """The entry's tensor, into `out` or a new tensor (see `TensorEntry.read`)."""
    return entry.read(out)


def tensors_equal(a: TensorEntry, b: TensorEntry) -> bool:
    """Whether two stored tensors hold the same bytes, compared in chunks (no full copies)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    for start in range(0, a.nbytes, _COMPARE_CHUNK_BYTES):
        length = min(_COMPARE_CHUNK_BYTES, a.nbytes - start)
        if a.file.read(a.offset + start, length) != b.file.read(b.offset + start, length):
            return False
    return True


def ordered_parts(numbered: list[tuple[int, Path]], part_name) -> list[Path]:
    """The paths of one set of raw parts, checked: numbered 0, 1, ... without a gap (`part_name(number)` names a
    missing one), and every part but the last as big as the first (chunks cut at a fixed size, as `split -b` does)."""
    numbered = sorted(numbered)
    for expected, (number, _) in enumerate(numbered):
        if number != expected:
            raise ModelFolderError(f"missing {part_name(expected)}")
    paths = [path for _, path in numbered]
    for path in paths[1:-1]:
        if path.stat().st_size != paths[0].stat().st_size:
            raise ModelFolderError(f"{path.name} is truncated: it is smaller than {paths[0].name}")
    return paths


def _split_groups(folder: Path) -> dict[str, list[Path]]:
    """Byte-split weight parts by file stem, checked to be numbered 00, 01, ... without gaps."""
    groups: dict[str, list[tuple[int, Path]]] = {}
    widths: dict[str, int] = {}
    for path in folder.iterdir():
        match = SPLIT_PART.match(path.name)
        if match and path.is_file():
            groups.setdefault(match.group("stem"), []).append((int(match.group("number")), path))
            widths[match.group("stem")] = len(match.group("number"))
    return {stem: ordered_parts(numbered, lambda n, stem=stem: f"weight part {stem}{n:0{widths[stem]}d}")
            for stem, numbered in groups.items()}


@dataclass
class WeightIndex:
    """Where every stored tensor lives."""

    files: list[PartedFile]
    entries: dict[str, TensorEntry] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(file.size for file in self.files)

    def close(self) -> None:
        for file in self.files:
            file.close()


def index_weights(folder: Path) -> WeightIndex:
    index_path = folder / INDEX_FILE
    split = _split_groups(folder)
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ModelFolderError(f"{INDEX_FILE}: cannot be read as a safetensors index ({err})") from err
        names = sorted(set(weight_map.values()))
        files = []
        for name in names:
            if (folder / name).is_file():
                files.append(PartedFile([folder / name]))
            elif name in split:
                files.append(PartedFile(split[name]))
            else:
                raise ModelFolderError(f"missing weight file {name} (listed in {INDEX_FILE})")
    else:
        singles = sorted(p for p in folder.glob("*.safetensors") if p.is_file())
        files = [PartedFile([p]) for p in singles] + [PartedFile(paths) for _, paths in sorted(split.items())]
        if not files:
            raise ModelFolderError(
                "missing weights: expected model.safetensors, a sharded model.safetensors.index.json, or "
                "byte-split parts such as gptq_model-4bit-128g.safetensors00"
            )
        weight_map = None

    index = WeightIndex(files)
    try:
        for file in files:
            for name, entry in _read_safetensors_header(file).items():
                if name in index.entries:
                    raise ModelFolderError(f"tensor {name} is stored twice ({index.entries[name].file.name}, {file.name})")
                index.entries[name] = entry
        if weight_map is not None:
            misplaced = [name for name in weight_map if name not in index.entries]
            if misplaced:
                raise ModelFolderError(
                    f"{weight_map[misplaced[0]]}: missing tensor {misplaced[0]} listed in {INDEX_FILE}"
                    + (f" (and {len(misplaced) - 1} more)" if len(misplaced) > 1 else "")
                )
    finally:
        index.close()  # handles reopen on demand; nothing stays open between checking and loading
    return index


__all__ = ["INDEX_FILE", "SPLIT_PART", "PartedFile", "TensorEntry", "WeightIndex", "index_weights", "read_tensor",
           "tensors_equal"]
