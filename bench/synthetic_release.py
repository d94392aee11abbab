"""Synthetic INT4 checkpoints shaped like the Yuan2-M32 release, and decode-step timing, shared by the benchmarks.

The checkpoint has the release's layer shapes (hidden 2048, 16 heads x 256 with the 512-wide Q/K concat, LFA
convolutions, attention router, 32 SwiGLU experts of 8192, the padded 135040 vocabulary with lm_head stored next to
the tied embedding), GPTQ 4-bit group-128 symmetric weights with random nibbles, written as byte-split parts
`gptq_model-4bit-128g.safetensors00..02` like the release. Only the number of layers differs.
"""

from __future__ import annotations

import argparse
import math
import shutil
import statistics
import sys
import tempfile
import threading
import time
import zlib
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import psutil
import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from playground.models.yuan.configuration_yuan import YuanConfig  # noqa: E402
from playground.models.yuan.gptq import GPTQSettings, QuantLinear  # noqa: E402
from playground.models.yuan.loading import build_model_skeleton  # noqa: E402
from playground.models.yuan.make_tiny import (  # noqa: E402
    INT4_WEIGHTS_NAME,
    resolve_tokenizer_dir,
    tiny_config_dict,
    write_folder_files,
    write_safetensors,
)
from playground.models.yuan.cache_yuan import YuanCache  # noqa: E402

RELEASE_LAYER = dict(
    vocab_size=135040,
    hidden_size=2048,
    num_attention_heads=16,
    attention_projection_size=4096,
    num_experts=32,
    top_k=2,
    ffn_hidden_size=8192,
    max_position_embeddings=4096,
)
RELEASE_LAYERS = 24
# The same structure at toy size: for smoke tests of the benchmarks themselves (`--tiny`), not for figures. The
# vocabulary stays the release's, so text from the real tokenizer fits.
TINY_LAYER = dict(RELEASE_LAYER, hidden_size=256, num_attention_heads=2,
                  attention_projection_size=512, num_experts=8, ffn_hidden_size=256)


def _specs(config: YuanConfig, gptq: GPTQSettings) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    skeleton = build_model_skeleton(config, gptq)
    specs = []
    for name, tensor in skeleton.state_dict(keep_vars=True).items():
        dtype = tensor.dtype if tensor.dtype in (torch.int32, torch.float16) else torch.float16
        specs.append((name, dtype, tuple(tensor.shape)))
    return specs


def _produce(name: str, specs: dict) -> torch.Tensor:
    dtype, shape = specs[name]
    # The release stores lm_head equal to the tied embedding: same seed, same values.
    seed = 0 if name in ("lm_head.weight", "model.embed_tokens.weight") else zlib.crc32(name.encode())
    generator = torch.Generator().manual_seed(seed)
    if name.endswith(".qweight"):
        return torch.randint(-(2**31), 2**31 - 1, shape, dtype=torch.int32, generator=generator)
    if name.endswith(".qzeros"):
        return torch.full(shape, 0x77777777, dtype=torch.int32)  # symmetric: zero-point 8 stored as 7
    if name.endswith(".g_idx"):
        return (torch.arange(shape[0]) // 128).to(torch.int32)
    if name.endswith(".scales"):
        # About 1/sqrt(fan_in) / 4.6 (the spread of uniform nibbles), so activations stay O(1) through the layers.
        fan_in = shape[0] * 128
        return ((torch.rand(shape, generator=generator) * 0.5 + 0.75) / (4.6 * math.sqrt(fan_in))).to(torch.float16)
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.float16)
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
    std = 0.02 if "embed_tokens" in name or name == "lm_head.weight" else 1 / math.sqrt(fan_in)
    return (torch.randn(shape, generator=generator) * std).to(torch.float16)


def layer_count_for(target_gb: float) -> int:
    """How many release-sized layers make a checkpoint of about `target_gb` (embedding and lm_head included)."""
    gptq = GPTQSettings()
    size = lambda specs: sum(math.prod(s) * torch.empty(0, dtype=d).element_size() for _, d, s in specs)  # noqa: E731
    one = size(_specs(YuanConfig(**tiny_config_dict(int4=True, num_hidden_layers=1, **RELEASE_LAYER)), gptq))
    two = size(_specs(YuanConfig(**tiny_config_dict(int4=True, num_hidden_layers=2, **RELEASE_LAYER)), gptq))
    per_layer, fixed = two - one, 2 * one - two
    return max(1, round((target_gb * 1e9 - fixed) / per_layer))


def write_release_checkpoint(folder: Path, layers: int, tokenizer_dir: Path, dims: dict = RELEASE_LAYER) -> int:
    """Write a release-layout INT4 checkpoint with `layers` release-sized layers; returns the packed bytes."""
    gptq = GPTQSettings()
    config_dict = tiny_config_dict(int4=True, num_hidden_layers=layers, **dims)
    write_folder_files(folder, config_dict, tokenizer_dir, gptq)
    specs = _specs(YuanConfig(**config_dict), gptq)
    by_name = {name: (dtype, shape) for name, dtype, shape in specs}
    parts = write_safetensors(specs, lambda name: _produce(name, by_name), folder, INT4_WEIGHTS_NAME, parts=3)
    return sum(p.stat().st_size for p in parts)


def write_release_gguf(path: Path, layers: int, tokenizer_dir: Path, dims: dict = RELEASE_LAYER) -> int:
    """The same model as the vendor's INT4 GGUF stores it (`Yuan2-M32-GGUF-INT4`): Q4_0 for every 2-D weight (random
    blocks, scales sized like `_produce`'s), Q6_K `output`, F16 convolutions, F32 norms and biases; `layers`
    release-sized layers, streamed to disk one tensor at a time. Returns the file's size."""
    import gguf

    from playground.models.yuan.make_tiny_gguf import _gguf_names, gguf_writer

    config = YuanConfig(**tiny_config_dict(num_hidden_layers=layers, **dims))
    hidden, projection, experts, ffn = (config.hidden_size, config.attention_projection_size, config.num_experts,
                                        config.expert_hidden_size)
    shapes = {"token_embd": (config.vocab_size, hidden), "output": (config.vocab_size, hidden),
              "attn_q": (projection, hidden), "attn_k": (projection, hidden), "attn_v": (projection, hidden),
              "attn_output": (hidden, projection), "conv1": (hidden // 2, hidden, 2, 1), "conv2": (hidden, hidden // 2, 2, 1),
              "mlp_attn_q": (experts, hidden), "mlp_attn_k": (experts, hidden), "mlp_attn_v": (experts, hidden),
              "ffn_gate": (2 * ffn, hidden), "ffn_down": (hidden, ffn)}
    one_d = {"conv1.bias": hidden // 2, "conv2.bias": hidden}
    q4, q6 = gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q6_K

    def plan(name: str):
        if name.endswith("norm.weight"):
            return gguf.GGMLQuantizationType.F32, (hidden,)
        for suffix, size in one_d.items():
            if name.endswith(suffix):
                return gguf.GGMLQuantizationType.F32, (size,)
        kind = name.split(".")[2] if name.startswith("blk.") else name.split(".")[0]
        shape = shapes[kind]
        if kind in ("conv1", "conv2"):
            return gguf.GGMLQuantizationType.F16, shape
        return (q6 if kind == "output" else q4), shape

    def produce(name: str, ggml_type, shape) -> np.ndarray:
        generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        if ggml_type == gguf.GGMLQuantizationType.F32:
            return np.ones(shape, dtype=np.float32) if name.endswith("norm.weight") else np.zeros(shape, np.float32)
        if ggml_type == gguf.GGMLQuantizationType.F16:
            return (torch.randn(shape, generator=generator) / math.sqrt(2 * shape[1])).to(torch.float16).numpy()
        block, block_bytes = gguf.GGML_QUANT_SIZES[ggml_type]
        rows, columns = shape
        data = torch.randint(0, 256, (rows, columns // block, block_bytes), dtype=torch.uint8, generator=generator)
        scale = 0.02 if name in ("token_embd.weight", "output.weight") else 1 / (4.6 * math.sqrt(columns))
        scale_bytes = torch.full((rows, columns // block, 1), scale, dtype=torch.float16).view(torch.uint8)
        if ggml_type == q4:
            data[..., :2] = scale_bytes  # d, then 16 bytes of nibbles
        else:
            data[..., 192:208] = torch.randint(-32, 32, (rows, columns // block, 16), generator=generator,
                                               dtype=torch.int8).view(torch.uint8)
            data[..., 208:] = (torch.full((rows, columns // block, 1), scale / 32, dtype=torch.float16)
                               .view(torch.uint8))
        return data.reshape(rows, -1).numpy()

    names = list(_gguf_names(config))
    plans = {name: plan(name) for name in names}
    writer = gguf_writer(path, config, tokenizer_dir, q4=True)
    for name in names:
        ggml_type, shape = plans[name]
        block, block_bytes = gguf.GGML_QUANT_SIZES[ggml_type]
        nbytes = math.prod(shape) // block * block_bytes
        byte_shape = (*shape[:-1], shape[-1] // block * block_bytes)
        dtype = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16}.get(ggml_type,
                                                                                                          np.uint8)
        writer.add_tensor_info(name, byte_shape if dtype == np.uint8 else shape, np.dtype(dtype), nbytes,
                               raw_dtype=ggml_type if dtype == np.uint8 else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for name in names:
        writer.write_tensor_data(produce(name, *plans[name]))
    writer.close()
    return path.stat().st_size


def add_checkpoint_arguments(parser: argparse.ArgumentParser, default_layers: int) -> None:
    parser.add_argument("--layers", type=int, default=default_layers,
                        help=f"release-sized layers to write and load (default {default_layers})")
    parser.add_argument("--reuse", type=Path, help="a checkpoint written earlier with --keep")
    parser.add_argument("--keep", type=Path, help="write the checkpoint here and keep it")
    parser.add_argument("--tokenizer-dir", type=Path, default=None)
    parser.add_argument("--tiny", action="store_true", help="toy-sized layers: checks the script, measures nothing")


@contextmanager
def checkpoint_folder(args: argparse.Namespace, prefix: str) -> Iterator[Path]:
    """The folder named by --reuse, or a checkpoint written as the arguments say (deleted afterwards unless --keep)."""
    folder = args.reuse or args.keep or Path(tempfile.mkdtemp(prefix=prefix))
    try:
        if args.reuse is None:
            start = time.perf_counter()
            packed = write_release_checkpoint(folder, args.layers, resolve_tokenizer_dir(args.tokenizer_dir),
                                              TINY_LAYER if args.tiny else RELEASE_LAYER)
            print(f"checkpoint: {args.layers} {'toy' if args.tiny else 'release'}-sized layers, byte-split parts, "
                  f"{packed / 1e9:.2f} GB (written in {time.perf_counter() - start:.0f}s)")
        yield folder
    finally:
        if args.reuse is None and args.keep is None:
            shutil.rmtree(folder, ignore_errors=True)


# --------------------------------------------------------------------------------------------------------------------
# measuring


def tensor_bytes(module: nn.Module) -> int:
    """Bytes of every distinct tensor a module holds (parameters and buffers, kernels' included)."""
    tensors = {t.data_ptr(): t for t in list(module.parameters()) + list(module.buffers()) if t.numel()}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def kv_bytes_per_position(model: nn.Module) -> int:
    """Cache bytes one position costs in one layer (keys and values)."""
    config = model.config
    cache_dtype = config.kv_cache_dtype
    dtype = getattr(torch, cache_dtype) if cache_dtype else model.model.norm.weight.dtype
    return 2 * config.num_attention_heads * config.head_dim * torch.empty(0, dtype=dtype).element_size()


def random_prompt(model: nn.Module, length: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, model.config.vocab_size, (1, length), generator=generator)
    return prompt.to(model.model.embed_tokens.weight.device)


class _LayerTimer:
    """Records each decoder layer's time (forward hooks) while `_time_layers(True)` is on."""

    def __init__(self, model: nn.Module, synchronize=lambda: None):
        self.model = model
        self.synchronize = synchronize
        self.layer_seconds: list[float] = []
        self._started: dict[int, float] = {}
        self._hooks = []

    def _time_layers(self, on: bool) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if not on:
            return
        for layer in self.model.model.layers:
            def before(module, args, key=id(layer)):
                self.synchronize()
                self._started[key] = time.perf_counter()

            def after(module, args, output, key=id(layer)):
                self.synchronize()
                self.layer_seconds.append(time.perf_counter() - self._started[key])

            self._hooks += [layer.register_forward_pre_hook(before), layer.register_forward_hook(after)]


class DecodeTimer(_LayerTimer):
    """Decode steps of `model` after a prompt of `context` tokens, with each decoder layer's time recorded."""

    def __init__(self, model: nn.Module, context: int, synchronize=lambda: None, seed: int = 0):
        super().__init__(model, synchronize)
        prompt = random_prompt(model, context, seed)
        self.cache = YuanCache(model.config)
        with torch.inference_mode():
            self.token = self._next(model(prompt, cache=self.cache, use_cache=True, logits_to_keep=1))

    @staticmethod
    def _next(output) -> torch.Tensor:
        return output.logits[:, -1].argmax(-1, keepdim=True)

    def steps(self, count: int, time_layers: bool = False) -> list[float]:
        """Seconds of each of `count` greedy decoding steps."""
        self._time_layers(time_layers)
        seconds = []
        try:
            with torch.inference_mode():
                for _ in range(count):
                    self.synchronize()
                    start = time.perf_counter()
                    self.token = self._next(self.model(self.token, cache=self.cache, use_cache=True))
                    self.synchronize()
                    seconds.append(time.perf_counter() - start)
        finally:
            self._time_layers(False)
        return seconds


class PrefillTimer(_LayerTimer):
    """Cold prefills of a random `length`-token prompt (a fresh cache each, `chunk` tokens per forward pass, the
    logits of the last position only), with each decoder layer's time recorded."""

    def __init__(self, model: nn.Module, length: int, chunk: int, synchronize=lambda: None, seed: int = 0):
        super().__init__(model, synchronize)
        self.prompt = random_prompt(model, length, seed)
        self.chunk = chunk
        self.chunks = math.ceil(length / chunk)  # forward passes per prefill

    def prefill(self) -> torch.Tensor:
        """The logits of the prompt's last position."""
        cache = YuanCache(self.model.config)
        with torch.inference_mode():
            for start in range(0, self.prompt.shape[1], self.chunk):
                chunk = self.prompt[:, start : start + self.chunk]
                logits = self.model(chunk, cache=cache, use_cache=True, logits_to_keep=1).logits
        return logits

    def steps(self, count: int, time_layers: bool = False) -> list[float]:
        """Seconds of each of `count` prefills."""
        self._time_layers(time_layers)
        seconds = []
        try:
            for _ in range(count):
                self.synchronize()
                start = time.perf_counter()
                self.prefill()
                self.synchronize()
                seconds.append(time.perf_counter() - start)
        finally:
            self._time_layers(False)
        return seconds


@contextmanager
def peak_rss_growth(interval: float = 0.005) -> Iterator[dict]:
    """Samples this process's resident memory while the block runs; `["bytes"]` is then its peak minus its start."""
    process = psutil.Process()
    start = process.memory_info().rss
    result = {"bytes": 0}
    done = threading.Event()

    def sample():
        while not done.is_set():
            result["bytes"] = max(result["bytes"], process.memory_info().rss - start)
            done.wait(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield result
    finally:
        done.set()
        sampler.join()
        result["bytes"] = max(result["bytes"], process.memory_info().rss - start)


def projection_by_truncation(model: nn.Module, context: int, steps: int, synchronize=lambda: None) -> dict:
    """Per-layer and fixed cost from whole steps with all layers and with half of them (no per-layer hooks, whose
    synchronisation would distort GPU timings). Needs at least two layers."""
    layers = model.model.layers
    half = len(layers) // 2
    medians = {}
    try:
        for count in (len(layers), half):
            model.model.layers = nn.ModuleList(list(layers)[:count])
            timer = DecodeTimer(model, context, synchronize)
            timer.steps(3)
            medians[count] = statistics.median(timer.steps(steps))
    finally:
        model.model.layers = layers
    per_layer = max((medians[len(layers)] - medians[half]) / (len(layers) - half), 1e-9)
    return _projected(medians[len(layers)], per_layer, len(layers))


def component_profile(model: nn.Module, timer: _LayerTimer, steps: int, synchronize=lambda: None) -> list[tuple]:
    """Where a step's time goes (a decode step, or a prefill with a `PrefillTimer`), by component, measured with
    hooks: rows (component, ms per step, share)."""
    roles = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            kind = "router projections" if ".mlp.gate." in name else (
                "expert w1/w2 (int4)" if ".experts." in name else "attention q/k/v/o (int4)")
            roles[module] = kind
        elif name.endswith("lf_gate"):
            roles[module] = "LFA filter"
        elif (name.endswith("layernorm") and "lf_gate" not in name) or name == "model.norm":  # the LFA's own is in it
            roles[module] = "RMSNorms"
        elif name == "lm_head":
            roles[module] = "lm_head (135040 x 2048)"
        elif name == "model.embed_tokens":
            roles[module] = "embedding"
    totals: dict[str, float] = defaultdict(float)
    started: dict[int, float] = {}
    hooks = []
    for module, role in roles.items():
        def before(mod, args, key=id(module)):
            synchronize()
            started[key] = time.perf_counter()

        def after(mod, args, output, key=id(module), role=role):
            synchronize()
            totals[role] += time.perf_counter() - started[key]

        hooks += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    try:
        step_seconds = sum(timer.steps(steps))
    finally:
        for hook in hooks:
            hook.remove()
    rows = [(role, seconds / steps * 1e3) for role, seconds in sorted(totals.items(), key=lambda kv: -kv[1])]
    accounted = sum(totals.values())
    rows.append(("everything else (attention over the cache, rotary, residuals, expert dispatch, Python)",
                 (step_seconds - accounted) / steps * 1e3))
    total_ms = step_seconds / steps * 1e3
    return [(role, ms, ms / total_ms) for role, ms in rows] + [("step total", total_ms, 1.0)]


def format_table(rows: list[tuple], header: tuple) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    line = lambda cells: "  " + "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(row) for row in rows])


def op_table(timer: _LayerTimer, steps: int = 4, top: int = 10) -> str:
    """The PyTorch ops taking the most time over `steps` of `timer`, per step."""
    timer.steps(min(steps, 2))  # warm-up
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        timer.steps(steps)
    rows = []
    for event in sorted(profiler.key_averages(), key=lambda e: -e.self_cpu_time_total)[:top]:
        rows.append((event.key, f"{event.self_cpu_time_total / steps / 1e3:.2f}", f"{event.count // steps}"))
    return format_table(rows, ("op", "self ms/step", "calls/step"))


def projection(model: nn.Module, step_seconds: list[float], layer_seconds: list[float]) -> dict:
    """Per-layer and fixed decode cost of a model with few layers, projected to the release's 24."""
    return _projected(statistics.median(step_seconds), statistics.median(layer_seconds), len(model.model.layers))


def _projected(step: float, per_layer: float, layers: int) -> dict:
    """A step of `layers` layers costing `step` seconds, `per_layer` of them each, as a 24-layer step."""
    fixed = max(step - layers * per_layer, 0.0)
    projected = fixed + RELEASE_LAYERS * per_layer
    return {"per_layer_ms": per_layer * 1e3, "fixed_ms": fixed * 1e3, "step_ms": step * 1e3,
            "projected_ms": projected * 1e3, "projected_tokens_per_s": 1.0 / projected}


def projected_memory(model: nn.Module, context: int) -> dict:
    """Bytes the release-sized model would hold: 24 layers like the first one, the rest as loaded, the KV cache."""
    layers = len(model.model.layers)
    one_layer = tensor_bytes(model.model.layers[0])
    total = tensor_bytes(model)
    fixed = total - sum(tensor_bytes(layer) for layer in model.model.layers)
    kv = kv_bytes_per_position(model) * RELEASE_LAYERS * context
    return {"layers": layers, "layer_bytes": one_layer, "fixed_bytes": fixed,
            "weights_bytes": fixed + RELEASE_LAYERS * one_layer, "kv_bytes": kv}


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    got, expected = got.double(), expected.double()
    return float((got - expected).norm() / expected.norm())


__all__ = [
    "DecodeTimer",
    "PrefillTimer",
    "RELEASE_LAYER",
    "RELEASE_LAYERS",
    "TINY_LAYER",
    "add_checkpoint_arguments",
    "checkpoint_folder",
    "component_profile",
    "format_table",
    "layer_count_for",
    "op_table",
    "peak_rss_growth",
    "projected_memory",
    "projection",
    "projection_by_truncation",
    "random_prompt",
    "relative_error",
    "tensor_bytes",
    "write_release_checkpoint",
    "write_release_gguf",
]
