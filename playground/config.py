"""Launch settings: command-line options, each with an environment variable for hosted setups (Spaces)."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass


@dataclass
class Settings:
    model: str | None = None  # None: the embedded SmolLM2
    device: str = "auto"
    dtype: str = "auto"
    host: str = "127.0.0.1"
    port: int = 7860
    share: bool = False
    api_key: str | None = None  # when set, the APIs need `Authorization: Bearer <api_key>`


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def parse_args(argv: list[str] | None = None) -> Settings:
    env = os.environ
    parser = argparse.ArgumentParser(
        prog="launch.py",
        description="Yuan2.0-M32 Playground: chat, sampling lab and memory panel around one model.",
    )
    parser.add_argument("--model", default=env.get("PLAYGROUND_MODEL") or None,
                        help="model folder (Yuan2-M32 INT4/float or any transformers causal LM with safetensors); "
                             "default: the embedded SmolLM2-135M-Instruct [PLAYGROUND_MODEL]")
    parser.add_argument("--device", default=env.get("PLAYGROUND_DEVICE", "auto"),
                        help="auto, cpu, cuda or cuda:N [PLAYGROUND_DEVICE]")
    parser.add_argument("--dtype", default=env.get("PLAYGROUND_DTYPE", "auto"),
                        choices=["auto", "float32", "float16", "bfloat16"], help="[PLAYGROUND_DTYPE]")
    parser.add_argument("--host", default=env.get("PLAYGROUND_HOST", "127.0.0.1"),
                        help="address to bind; 127.0.0.1 keeps it on this machine [PLAYGROUND_HOST]")
    parser.add_argument("--port", type=int, default=int(env.get("PLAYGROUND_PORT", "7860")), help="[PLAYGROUND_PORT]")
    parser.add_argument("--share", action="store_true", default=_env_flag("PLAYGROUND_SHARE"),
                        help="also open a public Gradio share link (off by default) [PLAYGROUND_SHARE]")
    parser.add_argument("--api-key", default=env.get("PLAYGROUND_API_KEY") or None,
                        help="require 'Authorization: Bearer KEY' on the APIs (POST / and /v1/*); "
                             "off by default [PLAYGROUND_API_KEY]")
    args = parser.parse_args(argv)
    return Settings(**vars(args))
