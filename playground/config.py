"""Launch settings: command-line options, each with an environment variable for hosted setups (Spaces)."""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass
from pathlib import Path

# A Hugging Face model repo id: "owner/name" (letters, digits, "-", "_", "."), not an existing path.
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


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


def on_spaces() -> bool:
    """Hugging Face Spaces sets SPACE_ID in every Space's environment."""
    return bool(os.environ.get("SPACE_ID"))


def default_host() -> str:
    # A Space routes traffic to 0.0.0.0:7860 inside its container; anywhere else stay on this machine.
    return os.environ.get("PLAYGROUND_HOST") or ("0.0.0.0" if on_spaces() else "127.0.0.1")


def resolve_hub_model(model: str | None, cache_dir: str | os.PathLike | None = None) -> str | None:
    """A hub repo id already in the local Hugging Face cache -> its snapshot folder; anything else unchanged.

    Spaces can preload a model repo into the cache (`preload_from_hub`); nothing is ever downloaded here.
    """
    if not model or Path(model).expanduser().exists() or not _REPO_ID.match(model):
        return model
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(model, local_files_only=True, cache_dir=cache_dir)
    except Exception:  # not cached (or no hub library): the loader then says the folder does not exist
        return model


def parse_args(argv: list[str] | None = None) -> Settings:
    env = os.environ
    parser = argparse.ArgumentParser(
        prog="launch.py",
        description="Yuan2.0-M32 Playground: chat, sampling lab and memory panel around one model.",
    )
    parser.add_argument("--model", default=env.get("PLAYGROUND_MODEL") or None,
                        help="model folder (Yuan2-M32 INT4/float or any transformers causal LM with safetensors), or a "
                             "hub repo id already in the local Hugging Face cache; "
                             "default: the embedded SmolLM2-135M-Instruct [PLAYGROUND_MODEL]")
    parser.add_argument("--device", default=env.get("PLAYGROUND_DEVICE", "auto"),
                        help="auto, cpu, cuda or cuda:N [PLAYGROUND_DEVICE]")
    parser.add_argument("--dtype", default=env.get("PLAYGROUND_DTYPE", "auto"),
                        choices=["auto", "float32", "float16", "bfloat16"], help="[PLAYGROUND_DTYPE]")
    parser.add_argument("--host", default=default_host(),
                        help="address to bind; 127.0.0.1 keeps it on this machine (0.0.0.0 on a Hugging Face "
                             "Space, detected by SPACE_ID) [PLAYGROUND_HOST]")
    parser.add_argument("--port", type=int, default=int(env.get("PLAYGROUND_PORT", "7860")), help="[PLAYGROUND_PORT]")
    parser.add_argument("--share", action="store_true", default=_env_flag("PLAYGROUND_SHARE"),
                        help="also open a public Gradio share link (off by default) [PLAYGROUND_SHARE]")
    parser.add_argument("--api-key", default=env.get("PLAYGROUND_API_KEY") or None,
                        help="require 'Authorization: Bearer KEY' on the APIs (POST / and /v1/*); "
                             "off by default [PLAYGROUND_API_KEY]")
    args = parser.parse_args(argv)
    args.model = resolve_hub_model(args.model)
    return Settings(**vars(args))
