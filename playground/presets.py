"""Sampling presets: shipped ones in assets/presets/*.json and the user's own, saved from the UI.

A preset file is JSON: {"name": ..., "description": ..., "source": where the values come from, "params": {...}}
where "params" is validated as SamplingParams. A broken file is reported by name and skipped, never fatal.
User presets live in $PLAYGROUND_PRESETS_DIR, else <cache dir>/presets (see playground.embedded.cache_root).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from playground.embedded import cache_root
from playground.errors import ParameterError
from playground.params import SamplingParams


def _shipped_dir() -> Path:
    """assets/presets: inside the package when installed (pyproject.toml maps assets/ to playground/assets), else
    beside the package in a source checkout (or an editable install, which imports from the checkout)."""
    package = Path(__file__).resolve().parent
    installed = package / "assets" / "presets"
    return installed if installed.is_dir() else package.parent / "assets" / "presets"


SHIPPED_DIR = _shipped_dir()
PRESETS_ENV = "PLAYGROUND_PRESETS_DIR"
MAX_NAME_LENGTH = 64
_NAME_PATTERN = re.compile(r"^[\w][\w .\-]*$")


class PresetError(ParameterError):
    """A preset file or name that cannot be used; the message says which and why."""


@dataclass
class Preset:
    name: str
    params: SamplingParams
    description: str = ""
    source: str = ""
    user: bool = False
    path: Path | None = None


def user_presets_dir() -> Path:
    if os.environ.get(PRESETS_ENV):
        return Path(os.environ[PRESETS_ENV]).expanduser()
    return cache_root() / "presets"


def load_preset_file(path: Path, user: bool = False) -> Preset:
    """Read and validate one preset file; raises PresetError naming the file and the problem."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise PresetError(f"preset {path.name}: cannot be read ({exc})") from None
    except ValueError as exc:
        raise PresetError(f"preset {path.name}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("params"), dict):
        raise PresetError(f'preset {path.name}: expected an object with a "params" object')
    name = data.get("name") or path.stem
    if not isinstance(name, str):
        raise PresetError(f'preset {path.name}: "name" must be a string')
    try:
        params = SamplingParams.parse(data["params"])
    except ParameterError as exc:
        raise PresetError(f"preset {path.name}: {exc}", field=exc.field) from None
    return Preset(name=name, params=params, description=str(data.get("description", "")),
                  source=str(data.get("source", "")), user=user, path=path)


def load_presets(user_dir: Path | None = None) -> tuple[dict[str, Preset], list[str]]:
    """All presets by name (shipped first, then the user's) and a message for each file that was skipped."""
    presets: dict[str, Preset] = {}
    problems: list[str] = []
    folders = [(SHIPPED_DIR, False), (user_dir or user_presets_dir(), True)]
    for folder, user in folders:
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob("*.json")):
            try:
                preset = load_preset_file(path, user=user)
            except PresetError as exc:
                problems.append(str(exc))
                continue
            if preset.name in presets and not presets[preset.name].user:
                problems.append(f"preset {path.name}: the name {preset.name!r} is a shipped preset's; skipped")
                continue
            presets[preset.name] = preset
    return presets, problems


def check_name(name: str) -> str:
    name = (name or "").strip()
    if not name:
        raise PresetError("give the preset a name", field="name")
    if len(name) > MAX_NAME_LENGTH or not _NAME_PATTERN.match(name):
        raise PresetError(
            f"a preset name is 1–{MAX_NAME_LENGTH} letters, digits, spaces, dots, dashes or underscores; got {name!r}",
            field="name",
        )
    return name


def save_user_preset(name: str, params: SamplingParams | dict, description: str = "",
                     user_dir: Path | None = None) -> Path:
    """Validate and write a user preset (replacing the user's own preset of that name); returns its file."""
    name = check_name(name)
    params = SamplingParams.parse(params)
    presets, _ = load_presets(user_dir)
    if name in presets and not presets[name].user:
        raise PresetError(f"{name!r} is a shipped preset; choose another name", field="name")
    folder = user_dir or user_presets_dir()
    folder.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^\w.-]+", "-", name).strip("-.").lower() or "preset"
    path = folder / f"{slug}.json"
    body = {"name": name, "description": description, "source": "saved from the playground UI",
            "params": params.model_dump()}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(body, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)  # never leave a half-written preset behind
    return path
