"""Sampling presets: shipped files, user presets saved and loaded, invalid files reported and skipped."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from playground.errors import ParameterError
from playground.params import SamplingParams
from playground.presets import PresetError, load_preset_file, load_presets, save_user_preset, user_presets_dir
from playground.ui.controls import control_values, params_from_controls
from playground.ui.lab_tab import SETTING_FIELDS, preset_in_row


@pytest.fixture(autouse=True)
def user_dir(tmp_path, monkeypatch):
    folder = tmp_path / "presets"
    monkeypatch.setenv("PLAYGROUND_PRESETS_DIR", str(folder))
    return folder


def test_shipped_presets_are_valid_and_documented():
    presets, problems = load_presets()
    assert problems == []
    assert {"greedy", "balanced", "creative", "precise", "Yuan2-M32 release"} <= set(presets)
    yuan = presets["Yuan2-M32 release"].params
    assert yuan.greedy and yuan.max_new_tokens == 256 and yuan.repetition_penalty == 1.0
    assert presets["balanced"].params == SamplingParams()  # the playground's defaults
    assert all(p.source and p.description and not p.user for p in presets.values())


def test_save_then_load_round_trips(user_dir):
    assert user_presets_dir() == user_dir
    params = SamplingParams(temperature=0.55, top_k=12, stop=["\n\n", "END"], seed=9, max_new_tokens=99)
    path = save_user_preset("My story mode", params, description="mine")
    assert path.parent == user_dir and json.loads(path.read_text())["params"]["top_k"] == 12
    presets, problems = load_presets()
    assert problems == [] and presets["My story mode"].user and presets["My story mode"].params == params
    # through the chat controls and back: what the dropdown fills is what gets saved
    assert params_from_controls(control_values(params)) == params
    save_user_preset("My story mode", params.replace(temperature=0.6))  # replacing one's own preset is fine
    assert load_presets()[0]["My story mode"].params.temperature == 0.6


def test_invalid_names_and_shipped_names_are_refused():
    for bad in ("", "   ", "../escape", "x" * 65):
        with pytest.raises(PresetError, match="name"):
            save_user_preset(bad, SamplingParams())
    with pytest.raises(PresetError, match="shipped preset"):
        save_user_preset("greedy", SamplingParams())
    with pytest.raises(ParameterError, match="temperature"):
        save_user_preset("hot", {"temperature": 9})


def test_invalid_files_are_reported_and_skipped(user_dir):
    user_dir.mkdir()
    (user_dir / "broken.json").write_text("{not json")
    (user_dir / "range.json").write_text(json.dumps({"name": "range", "params": {"temperature": 7}}))
    (user_dir / "unknown.json").write_text(json.dumps({"params": {"beam_width": 3}}))
    (user_dir / "shape.json").write_text(json.dumps(["temperature", 1]))
    (user_dir / "fine.json").write_text(json.dumps({"params": {"temperature": 0.2}}))
    presets, problems = load_presets()
    assert "fine" in presets and presets["fine"].params.temperature == 0.2
    text = " | ".join(problems)
    assert len(problems) == 4
    assert "broken.json: not valid JSON" in text and "range.json: temperature: must be between 0 and 5" in text
    assert "unknown.json: beam_width: is not a sampling parameter" in text and 'shape.json: expected an object' in text
    with pytest.raises(PresetError, match="range.json"):
        load_preset_file(user_dir / "range.json")


def test_lab_preset_fills_a_row():
    table = pd.DataFrame([[0.7, 0.9, 50, 0, 1, 1, 0, 64, 1234]] * 2, columns=SETTING_FIELDS)
    filled = preset_in_row(table, "precise", 2)
    assert list(filled["temperature"]) == [0.7, 0.3] and filled.iloc[1]["top_k"] == 20
    added = preset_in_row(table, "greedy", 3)
    assert len(added) == 3 and added.iloc[2]["temperature"] == 0
    with pytest.raises(ParameterError, match="no preset named"):
        preset_in_row(table, "nope", 1)
    with pytest.raises(ParameterError, match="row between 1 and 3"):
        preset_in_row(table, "greedy", 5)
