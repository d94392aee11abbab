"""Fixtures for the Yuan2-M32 tests: tiny random checkpoints written once per session, the release tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

# The release tokenizer lives next to the checkout, read-only: ../shared/yuan2-tokenizer from the repository root.
TOKENIZER_DIR = Path(__file__).resolve().parents[2] / ".." / "shared" / "yuan2-tokenizer"

# Small enough to build in milliseconds, still INT4-packable (input widths multiples of 128, 8 experts).
SMALL_DIMS = dict(
    vocab_size=4096,
    hidden_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    attention_projection_size=256,
    num_experts=8,
    top_k=2,
    ffn_hidden_size=128,
    max_position_embeddings=512,
)


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    assert (TOKENIZER_DIR / "tokenizer.model").is_file(), f"release tokenizer missing at {TOKENIZER_DIR}"
    return TOKENIZER_DIR


@pytest.fixture(scope="session")
def yuan_tokenizer(tokenizer_dir):
    from playground.models.yuan.tokenization_yuan import load_yuan_tokenizer

    return load_yuan_tokenizer(tokenizer_dir)


@pytest.fixture(scope="session")
def small_config():
    from playground.models.yuan.configuration_yuan import YuanConfig
    from playground.models.yuan.make_tiny import tiny_config_dict

    return YuanConfig(**tiny_config_dict(**SMALL_DIMS))


@pytest.fixture(scope="session")
def double_model(small_config):
    """A random float64 model: cached/uncached and padded/unpadded paths agree to rounding noise, so greedy
    decoding comparisons cannot flip on near-ties."""
    from playground.models.yuan.make_tiny import random_float_model

    return random_float_model(small_config, seed=1).double()


@pytest.fixture(scope="session")
def tiny_float_dir(tmp_path_factory, tokenizer_dir) -> Path:
    from playground.models.yuan.make_tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("yuan_float"), tokenizer_dir=tokenizer_dir, seed=2, **SMALL_DIMS)


@pytest.fixture(scope="session")
def tiny_int4_dir(tmp_path_factory, tokenizer_dir) -> Path:
    from playground.models.yuan.make_tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(
        tmp_path_factory.mktemp("yuan_int4"), int4=True, tokenizer_dir=tokenizer_dir, seed=3, **SMALL_DIMS
    )


@pytest.fixture(scope="session")
def tiny_int8_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """The INT8 release's layout (GPTQ bits 8, four values per int32)."""
    from playground.models.yuan.make_tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(
        tmp_path_factory.mktemp("yuan_int8"), int4=True, bits=8, tokenizer_dir=tokenizer_dir, seed=5, **SMALL_DIMS
    )


@pytest.fixture(scope="session")
def full_vocab_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """Float checkpoint with the release's padded vocabulary (135040), for tests that use the real tokenizer."""
    from playground.models.yuan.make_tiny import make_tiny_checkpoint

    dims = {**SMALL_DIMS, "vocab_size": 135040, "num_hidden_layers": 1}
    return make_tiny_checkpoint(tmp_path_factory.mktemp("yuan_full_vocab"), tokenizer_dir=tokenizer_dir, seed=4, **dims)


@pytest.fixture(scope="session")
def full_vocab_model(full_vocab_dir):
    from playground.models.yuan.loading import load_yuan

    return load_yuan(full_vocab_dir)


@pytest.fixture(scope="session")
def dequantised_copy():
    """A function: the float model of an exact-mode GPTQ model's dequantised weights (no QuantLinear left)."""
    from transformers.initialization import no_init_weights

    from playground.models.yuan.gptq import QuantLinear, dequantize_linear
    from playground.models.yuan.modeling_yuan import YuanForCausalLM

    def copy(model):
        with no_init_weights():  # every weight comes from `model` below
            reference = YuanForCausalLM(model.config).eval()
        packed = ("qweight", "qzeros", "scales", "g_idx")
        reference.load_state_dict(
            {k: v for k, v in model.state_dict().items() if k.split(".")[-1] not in packed}, strict=False
        )
        for name, module in model.named_modules():
            if isinstance(module, QuantLinear):
                parent, _, child = name.rpartition(".")
                setattr(reference.get_submodule(parent), child, dequantize_linear(module))
        reference.tie_weights()
        return reference

    return copy


@pytest.fixture(autouse=True)
def single_thread_torch():
    """Tiny models gain nothing from intra-op threads, and on a busy machine the thread pool stalls every op for
    milliseconds; one thread keeps these tests fast and their timing stable."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
