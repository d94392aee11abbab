"""Sampling lab: one prompt under 2–6 settings side by side, or a sweep of one parameter; seeded runs,
per-cell stats, a results table and CSV export."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from playground.errors import ParameterError, PlaygroundError
from playground.manager import get_manager
from playground.params import SamplingParams

MAX_COLUMNS = 6
SETTING_FIELDS = [
    "temperature", "top_p", "top_k", "min_p", "typical_p",
    "repetition_penalty", "no_repeat_ngram_size", "max_new_tokens", "seed",
]
INT_FIELDS = {"top_k", "no_repeat_ngram_size", "max_new_tokens", "seed"}
SWEEPABLE = [f for f in SETTING_FIELDS]


def default_settings(count: int = 2) -> pd.DataFrame:
    base = SamplingParams(seed=1234, max_new_tokens=64)
    temperatures = [0.0, 0.7, 1.0, 1.3, 0.4, 1.6]
    rows = [{**{f: getattr(base, f) for f in SETTING_FIELDS}, "temperature": temperatures[i]} for i in range(count)]
    return pd.DataFrame(rows, columns=SETTING_FIELDS)


def settings_from_table(table: Any) -> list[SamplingParams]:
    """Rows of the settings table -> validated params; the error names the row and the field."""
    frame = table if isinstance(table, pd.DataFrame) else pd.DataFrame(table)
    if isinstance(table, dict) and "data" in table:
        frame = pd.DataFrame(table["data"], columns=table.get("headers") or SETTING_FIELDS)
    frame = frame.dropna(how="all")
    if not 1 <= len(frame) <= MAX_COLUMNS:
        raise ParameterError(f"the lab runs 1 to {MAX_COLUMNS} settings at once; the table has {len(frame)} rows")
    unknown = [c for c in frame.columns if c not in SETTING_FIELDS]
    if unknown:
        raise ParameterError(f"unknown columns in the settings table: {', '.join(map(str, unknown))}")
    result = []
    for number, (_, row) in enumerate(frame.iterrows(), start=1):
        values: dict[str, Any] = {}
        for name in SETTING_FIELDS:
            if name not in row or pd.isna(row[name]) or row[name] == "":
                continue
            value = row[name]
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise ParameterError(f"setting {number}: {name} must be a number, got {value!r}", field=name) from None
            if name in INT_FIELDS:
                if not value.is_integer():
                    raise ParameterError(f"setting {number}: {name} must be a whole number, got {value}", field=name)
                value = int(value)
            values[name] = value
        try:
            result.append(SamplingParams.parse(values))
        except ParameterError as exc:
            raise ParameterError(f"setting {number}: {exc}", field=exc.field) from None
    return result


def sweep_table(base_table: Any, parameter: str, values_text: str) -> pd.DataFrame:
    """The first row of the table repeated, with `parameter` set to each listed value."""
    if parameter not in SWEEPABLE:
        raise ParameterError(f"{parameter!r} cannot be swept; choose one of {', '.join(SWEEPABLE)}")
    base = settings_from_table(base_table)[0]
    parts = [p.strip() for p in str(values_text).replace(";", ",").split(",") if p.strip()]
    if not 2 <= len(parts) <= MAX_COLUMNS:
        raise ParameterError(f"give 2 to {MAX_COLUMNS} values separated by commas, got {len(parts)}")
    rows = []
    for part in parts:
        try:
            value = float(part)
        except ValueError:
            raise ParameterError(f"sweep value {part!r} is not a number", field=parameter) from None
        value = int(value) if parameter in INT_FIELDS and value.is_integer() else value
        rows.append(base.replace(**{parameter: value}).model_dump(include=set(SETTING_FIELDS)))
    return pd.DataFrame(rows, columns=SETTING_FIELDS)


def results_frame(prompt: str, settings: list[SamplingParams], outputs: list[str], stats: list[Any]) -> pd.DataFrame:
    rows = []
    for number, (params, text, result) in enumerate(zip(settings, outputs, stats), start=1):
        row = {"setting": number, **params.model_dump(include=set(SETTING_FIELDS))}
        if result is not None:
            row.update(
                seed=result.seed,
                prompt_tokens=result.prompt_tokens,
                new_tokens=result.new_tokens,
                time_to_first_token_s=round(result.time_to_first_token_s or 0, 3),
                decode_tokens_per_s=round(result.decode_tokens_per_s or 0, 2),
                total_s=round(result.total_s, 3),
                finish_reason=result.finish_reason,
                characters=len(text),
                words=len(text.split()),
            )
        row.update(prompt=prompt, output=text)
        rows.append(row)
    return pd.DataFrame(rows)


def write_csv(frame: pd.DataFrame) -> str:
    folder = Path(tempfile.mkdtemp(prefix="lab-"))
    path = folder / f"sampling-lab-{time.strftime('%Y%m%d-%H%M%S')}.csv"
    frame.to_csv(path, index=False)
    return str(path)


def run_lab(prompt: str, table: Any, request: gr.Request | None = None):
    """Run the prompt under each setting in turn (through the manager's queue), streaming into the cells."""
    owner = getattr(request, "session_hash", None)
    empty_cells = [gr.update(value="", visible=False)] * MAX_COLUMNS + [gr.update(value="", visible=False)] * MAX_COLUMNS
    try:
        if not prompt or not str(prompt).strip():
            raise ParameterError("the prompt is empty", field="prompt")
        settings = settings_from_table(table)
    except PlaygroundError as exc:
        gr.Warning(str(exc))
        yield (*empty_cells, None, None, f"⚠️ {exc}")
        return
    outputs = [""] * len(settings)
    stats: list[Any] = [None] * len(settings)
    lines = ["waiting"] * len(settings)

    def cells():
        texts = [gr.update(value=outputs[i], visible=True, label=f"Setting {i + 1}") if i < len(settings)
                 else gr.update(value="", visible=False) for i in range(MAX_COLUMNS)]
        notes = [gr.update(value=lines[i], visible=True) if i < len(settings) else gr.update(value="", visible=False)
                 for i in range(MAX_COLUMNS)]
        return texts + notes

    manager = get_manager()
    for index, params in enumerate(settings):
        try:
            for event in manager.stream(prompt=None, messages=[{"role": "user", "content": prompt}], params=params, owner=owner):
                if event.kind == "queued":
                    lines[index] = f"waiting: place {event.position}"
                elif event.kind == "delta":
                    outputs[index] += event.text
                    lines[index] = "generating…"
                elif event.kind == "done":
                    outputs[index] = event.text
                    stats[index] = event.stats
                    lines[index] = event.stats.summary() if event.stats.finish_reason != "error" else f"⚠️ {event.stats.error}"
                yield (*cells(), None, None, f"Running setting {index + 1} of {len(settings)}")
        except PlaygroundError as exc:
            lines[index] = f"⚠️ {exc}"
            yield (*cells(), None, None, f"⚠️ {exc}")
            return
        if stats[index] is not None and stats[index].finish_reason == "cancelled":
            break
    frame = results_frame(prompt, settings, outputs, stats)
    yield (*cells(), frame, write_csv(frame), f"Done: {sum(s is not None for s in stats)} of {len(settings)} settings")


def build_lab_tab():
    with gr.Tab("Sampling lab", id="lab"):
        gr.Markdown(
            "Run one prompt under several sampling settings side by side. Each row of the table is one setting "
            "(2–6 rows); the same seed and settings reproduce the same text."
        )
        prompt = gr.Textbox(label="Prompt", lines=3, value="Write a short poem about the sea.", elem_id="lab-prompt")
        table = gr.Dataframe(
            value=default_settings(2), headers=SETTING_FIELDS, label="Settings (one row per column)",
            interactive=True, row_count=(2, "dynamic"), column_count=(len(SETTING_FIELDS), "fixed"),
            elem_id="lab-settings",
        )
        with gr.Row():
            sweep_parameter = gr.Dropdown(SWEEPABLE, value="temperature", label="Sweep parameter")
            sweep_values = gr.Textbox(value="0.2, 0.7, 1.2", label="Values (comma separated)")
            sweep_button = gr.Button("Fill table with sweep")
        with gr.Row():
            run = gr.Button("Run", variant="primary", elem_id="lab-run")
            stop = gr.Button("Stop", variant="stop", elem_id="lab-stop")
        status = gr.Markdown("", elem_id="lab-status")
        texts, notes = [], []
        with gr.Row(equal_height=False):
            for i in range(MAX_COLUMNS):
                with gr.Column(min_width=180):
                    texts.append(gr.Textbox(label=f"Setting {i + 1}", lines=8, visible=i < 2, interactive=False))
                    notes.append(gr.Markdown("", visible=i < 2))
        results = gr.Dataframe(label="Results", interactive=False, wrap=True, elem_id="lab-results")
        csv_file = gr.File(label="Results as CSV", elem_id="lab-csv")

        def fill_sweep(table, parameter, values):
            try:
                return sweep_table(table, parameter, values), f"Sweep of {parameter}: {values}"
            except PlaygroundError as exc:
                gr.Warning(str(exc))
                return table, f"⚠️ {exc}"

        def stop_lab(request: gr.Request = None):
            owner = getattr(request, "session_hash", None)
            return "Stopping…" if owner and get_manager().cancel(owner) else "Nothing is running."

        sweep_button.click(fill_sweep, [table, sweep_parameter, sweep_values], [table, status], api_name="lab_sweep")
        run.click(run_lab, [prompt, table], [*texts, *notes, results, csv_file, status], api_name="lab_run",
                  concurrency_limit=None)
        stop.click(stop_lab, None, status, api_name="lab_stop", queue=False)
