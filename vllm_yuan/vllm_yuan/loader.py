"""`--load-format yuan`: the release's weight files read in place, byte-split parts included.

The INT4 release ships `gptq_model-4bit-128g.safetensors00/01/02`, raw byte chunks of one safetensors file that
vLLM's default loader does not see. This loader reads every Yuan layout (one file, a sharded index, or split parts)
through the playground's `safetensors_parts` reader: nothing is joined on disk and one tensor at a time is in memory.
"""

from __future__ import annotations

import time
from collections.abc import Generator
from pathlib import Path

import torch
from torch import nn
from vllm.config import ModelConfig
from vllm.model_executor.model_loader import register_model_loader
from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

from .safetensors_parts import index_weights, read_tensor

LOAD_FORMAT = "yuan"


def release_weights(folder: str | Path) -> Generator[tuple[str, torch.Tensor], None, None]:
    index = index_weights(Path(folder))
    try:
        for name, entry in index.entries.items():
            yield name, read_tensor(entry)
    finally:
        index.close()


@register_model_loader(LOAD_FORMAT)
class YuanReleaseLoader(DefaultModelLoader):
    def download_model(self, model_config: ModelConfig) -> None:
        if not Path(model_config.model).is_dir():
            raise ValueError(f"--load-format {LOAD_FORMAT} reads a local model folder; {model_config.model} is not one")

    def get_all_weights(self, model_config: ModelConfig, model: nn.Module):
        # The default loader starts the clock of its "Loading weights took ..." line where it opens the files; left
        # at 0 it would report the machine's uptime.
        if self.counter_before_loading_weights == 0.0:
            self.counter_before_loading_weights = time.perf_counter()
        yield from release_weights(model_config.model)
