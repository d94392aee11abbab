"""Model panel: load another model from the UI, only from the folders under `--models-root`.

A browser user must never name an arbitrary path on the server, so the panel takes the name of one entry directly
under the models root (a model folder or a .gguf file) and refuses anything that resolves outside it: absolute
paths, `..`, and symlinks pointing elsewhere. Without a models root it offers only the embedded model.
"""

from __future__ import annotations

import concurrent.futures
from pathlib import Path
from typing import Iterator

import gradio as gr

from playground.errors import ModelFolderError, PlaygroundError, not_unicode
from playground.manager import ModelManager
from playground.model_loading import EMBEDDED
from playground.models.yuan.gguf_yuan import GGUF_PART
from playground.ui.controls import refresh_choices_on_focus, refusal

ENABLE_HINT = ("Loading model folders from the UI is off: start the server with `--models-root DIR` "
               "(or `PLAYGROUND_MODELS_ROOT=DIR`) to offer the folders under DIR here.")
# Without --models-root the panel has nothing to load: it says how to serve the model the app is named for.
SERVE_YUAN = """**To serve Yuan2.0-M32**, restart the playground with its folder (the INT4 GPTQ release, its float
release, or the vendor's GGUF file):

```bash
python launch.py --model /models/Yuan2-M32-hf-int4
```

or with `--models-root /models` to choose among the folders under it here. On a GPU server, run it on vLLM with this
playground's plugin (`pip install ./vllm_yuan`) and put the playground in front:

```bash
python -m vllm.entrypoints.openai.api_server --model /models/Yuan2-M32-hf-int4 --tokenizer-mode yuan \\
    --quantization gptq --load-format yuan --dtype float16 --port 8000
python launch.py --backend openai --base-url http://127.0.0.1:8000/v1
```"""
POLL_S = 0.5


class ModelChoiceError(PlaygroundError):
    """A model the panel will not load; the message says why."""


MAX_NAME_CHARS = 255


def _inside(path: Path, root: Path) -> bool:
    return path.resolve().is_relative_to(root.resolve())


def model_choices(models_root: str | None) -> list[str]:
    """The embedded model, then the folders and .gguf files directly under the models root that stay inside it."""
    choices = [EMBEDDED]
    if not models_root:
        return choices
    root = Path(models_root).expanduser()
    try:
        entries = sorted(root.iterdir())
    except OSError:
        return choices
    for entry in entries:
        if entry.name.startswith(".") or not _inside(entry, root):
            continue
        part = GGUF_PART.match(entry.name)
        if part and int(part.group("number")) != 0:
            continue  # a byte-split GGUF is listed once, by its first part
        if entry.is_dir() or (entry.is_file() and entry.suffix == ".gguf"):
            choices.append(entry.name)
    return choices


def resolve_choice(choice: str | None, models_root: str | None) -> str | None:
    """The path the manager should load for a panel choice (None: the embedded model); refuses anything else."""
    name = (choice or "").strip()
    if not name:
        raise ModelChoiceError("choose a model first")
    if name == EMBEDDED:
        return None
    if len(name) > MAX_NAME_CHARS:  # file systems allow 255 bytes a name; the message does not echo it all
        raise ModelChoiceError(f"a model name is at most {MAX_NAME_CHARS} characters; this one has {len(name)}")
    problem = not_unicode(name, "the model name")
    if problem:
        raise ModelChoiceError(problem)
    if not models_root:
        raise ModelChoiceError(f"{name!r} cannot be loaded: {ENABLE_HINT}")
    if "/" in name or "\\" in name or name in (".", "..") or "\x00" in name:
        raise ModelChoiceError(f"{name!r} is refused: give the name of a folder under the models root, not a path")
    root = Path(models_root).expanduser()
    candidate = root / name
    try:
        exists = candidate.exists()
    except OSError as exc:  # e.g. a name longer than the file system takes
        raise ModelChoiceError(f"{name!r} cannot be looked up: {exc.strerror}") from None
    if not exists:
        raise ModelChoiceError(f"there is no {name!r} under the models root")
    if not _inside(candidate, root):
        raise ModelChoiceError(f"{name!r} is refused: it points outside the models root")
    if candidate.is_file():
        if candidate.suffix != ".gguf":
            raise ModelChoiceError(f"{name!r} is a file; the panel loads model folders and .gguf files")
        return str(candidate)
    # A folder whose files link outside the root would let the loader read them: refuse it as a whole.
    escaping = sorted(entry.name for entry in candidate.iterdir() if not _inside(entry, root))
    if escaping:
        raise ModelChoiceError(f"{name!r} is refused: {', '.join(escaping)} point(s) outside the models root")
    return str(candidate)


def load_choice(manager: ModelManager, choice: str | None, models_root: str | None, device: str = "auto",
                dtype: str = "auto") -> Iterator[str]:
    """Load a panel choice (on a thread of its own: `ModelManager.load_on_thread`), yielding progress lines and
    then the outcome."""
    try:
        target = resolve_choice(choice, models_root)
    except PlaygroundError as exc:
        yield refusal(exc)
        return
    loaded = manager.loaded
    if loaded is not None and (loaded.kind == "embedded" if target is None else loaded.path == target):
        yield f"**{loaded.name}** is already loaded: nothing to do."  # a second load would only cost time
        return
    loading_done = manager.load_on_thread(target, device=device, dtype=dtype)
    while not loading_done.done():
        loading = manager.status().get("loading")
        if loading:
            yield f"⏳ Loading **{choice}**: {loading['message']} ({loading['fraction']:.0%})"
        concurrent.futures.wait([loading_done], timeout=POLL_S)
    try:
        result = loading_done.result()
    except Exception as exc:  # never lost in the thread: the user sees it
        yield refusal(exc if isinstance(exc, PlaygroundError) else ModelFolderError(
            f"loading {choice} failed: {type(exc).__name__}: {exc}"))
        return
    yield f"✅ Loaded **{result['name']}** ({result['kind']}, {result['dtype']} on {result['device']}) in {result['load_time_s']:.1f} s"


def build_model_panel(manager: ModelManager, models_root: str | None, device: str = "auto", dtype: str = "auto",
                      started_elsewhere: bool = False) -> None:
    """With a models root: its folders to load. Without: how to serve Yuan2-M32, and the chooser only where the
    embedded model is something to switch to (the server started with another model or a remote engine); hidden, its
    API endpoint still answers why nothing loads."""
    with gr.Accordion("Model", open=False, elem_id="model-panel"):
        gr.Markdown(f"Folders under `{models_root}` and the embedded model." if models_root else SERVE_YUAN,
                    elem_id="model-panel-help")
        with gr.Row(visible=bool(models_root) or started_elsewhere):
            chooser = gr.Dropdown(model_choices(models_root), value=EMBEDDED, label="Model", scale=4,
                                  allow_custom_value=True, elem_id="model-choice")
            load = gr.Button("Load", variant="primary", scale=1, elem_id="model-load")
        outcome = gr.Markdown("", elem_id="model-load-status")

        def load_model(choice):
            yield from load_choice(manager, choice, models_root, device=device, dtype=dtype)

        refresh_choices_on_focus(chooser, lambda: model_choices(models_root), api_name="model_choices")
        load.click(load_model, chooser, outcome, api_name="model_load", concurrency_limit=None)
