"""Sampling lab: one prompt under 2–6 settings side by side, or a sweep of one parameter; seeded runs,
per-cell stats, a compact results table, a chart of a sweep's metrics and CSV export. The next-token explorer
below it lives in explorer.py."""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from playground.errors import ParameterError, PlaygroundError
from playground.insight import INSPECT_TOP, for_people, mean_logprob, readable, routing_to_state, tokens_to_state
from playground.manager import ModelManager
from playground.params import EXAMPLE_BASE, EXAMPLE_FIELD, NUMERIC_FIELDS, SamplingParams
from playground.presets import load_presets
from playground.structured import checked_reply, schema_from_text
from playground.storage import LabCell, Storage, StorageError
from playground.ui.controls import preset_names, session_owner
from playground.ui.explorer import build_next_token_explorer

MAX_COLUMNS = 6
SETTING_FIELDS = NUMERIC_FIELDS  # the table's columns, and what can be swept


def table_row(params: SamplingParams) -> dict[str, Any]:
    """One setting as a table row (and as saved with a run): every column, without the stop strings."""
    return params.model_dump(include=set(SETTING_FIELDS))


def default_settings(count: int = 2) -> pd.DataFrame:
    """The example: the same seed, the example field at its first `count` example values."""
    base = SamplingParams(**EXAMPLE_BASE)
    rows = [table_row(base.replace(**{EXAMPLE_FIELD.name: value})) for value in EXAMPLE_FIELD.limits.example[:count]]
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
        try:
            cells = row.astype(object).where(row.notna(), None)  # an empty cell (NaN in pandas) is a blank
            result.append(SamplingParams.from_form(cells.to_dict()))
        except ParameterError as exc:
            raise ParameterError(f"setting {number}: {exc}", field=exc.field) from None
    return result


def sweep_table(base_table: Any, parameter: str, values_text: str) -> pd.DataFrame:
    """The first row of the table repeated, with `parameter` set to each listed value."""
    if parameter not in SETTING_FIELDS:
        raise ParameterError(f"{parameter!r} cannot be swept; choose one of {', '.join(SETTING_FIELDS)}")
    base = settings_from_table(base_table)[0]
    parts = [p.strip() for p in str(values_text).replace(";", ",").split(",") if p.strip()]
    if not 2 <= len(parts) <= MAX_COLUMNS:
        raise ParameterError(f"give 2 to {MAX_COLUMNS} values separated by commas, got {len(parts)}")
    rows = [table_row(base.replace(**{parameter: part})) for part in parts]
    return pd.DataFrame(rows, columns=SETTING_FIELDS)


def preset_in_row(table: Any, preset_name: str, row: Any) -> pd.DataFrame:
    """The settings table with row `row` (1-based; one past the end adds a row) set to a preset's settings."""
    presets, problems = load_presets()
    if preset_name not in presets:
        extra = f" ({'; '.join(problems)})" if problems else ""
        raise ParameterError(f"no preset named {preset_name!r}{extra}")
    current = settings_from_table(table)
    if row in (None, "") or not float(row).is_integer():
        raise ParameterError("choose a row number", field="row")
    number = int(row)
    if not 1 <= number <= min(len(current) + 1, MAX_COLUMNS):
        raise ParameterError(f"choose a row between 1 and {min(len(current) + 1, MAX_COLUMNS)}", field="row")
    rows = [table_row(p) for p in current]
    values = table_row(presets[preset_name].params)
    if number > len(rows):
        rows.append(values)
    else:
        rows[number - 1] = values
    return pd.DataFrame(rows, columns=SETTING_FIELDS)


def results_frame(prompt: str, settings: list[SamplingParams], outputs: list[str], stats: list[Any]) -> pd.DataFrame:
    """Every parameter and metric of a run, one row per setting: the CSV (and History's export) columns."""
    rows = []
    for number, (params, text, result) in enumerate(zip(settings, outputs, stats), start=1):
        row = {"setting": number, **table_row(params)}
        if result is not None:
            row.update(
                seed=result.seed,
                prompt_tokens=result.prompt_tokens,
                cached_prompt_tokens=result.cached_tokens,
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


# What the on-screen results table shows of results_frame's columns, under short headers (the CSV has them all).
SHOWN_METRICS = {"new_tokens": "tokens", "decode_tokens_per_s": "tok/s", "time_to_first_token_s": "first token s",
                 "total_s": "total s", "mean_logprob": "mean logprob", "finish_reason": "finish"}
# Its columns always the same and their widths fixed, so it fits the page whatever the run: a long cell ends in "…"
# and shows all of itself when clicked.
RESULT_COLUMNS = ["#", "settings", *SHOWN_METRICS.values(), "output"]
RESULT_WIDTHS = ["4%", "25%", "6%", "6%", "11%", "7%", "10%", "8%", "23%"]
SWEPT_VALUE = "swept value"
SWEEP_METRICS = {"tokens/s": "decode_tokens_per_s", "new tokens": "new_tokens", "mean logprob": "mean_logprob"}


def varying_fields(rows: list[dict[str, Any]]) -> list[str]:
    """The setting fields whose value differs between rows (in the table's column order)."""
    return [name for name in SETTING_FIELDS if len({repr(row.get(name)) for row in rows}) > 1]


def describe(row: dict[str, Any], names: list[str]) -> str:
    """`name value` pairs for a label, numbers as people read them; an empty seed is a random one (a cell that
    never ran has no seed: blank)."""
    return ", ".join(f"{name} {'random' if row.get(name) is None else for_people(row[name]) or '–'}"
                     for name in names)


def setting_labels(settings: list[SamplingParams]) -> tuple[list[str], str]:
    """Each output card's label (what its setting changes) and a line with what every setting shares."""
    rows = [table_row(params) for params in settings]
    varying = varying_fields(rows)
    shared = [name for name in SETTING_FIELDS if name not in varying]
    labels = [f"Setting {number}" + (f" · {describe(row, varying)}" if varying else "")
              for number, row in enumerate(rows, start=1)]
    what = "Same in every setting" if len(rows) > 1 else "Setting"
    return labels, f"**{what}:** {describe(rows[0], shared)}" if shared else ""


def results_view(frame: pd.DataFrame, logprobs: list[float | None]) -> pd.DataFrame:
    """The results table as shown: the setting's number, the settings that differ between rows (the rest are said
    once above the outputs), the metrics under short headers and the output on one line."""
    frame = frame.assign(mean_logprob=logprobs)
    frame = frame.reindex(columns=list(dict.fromkeys([*frame.columns, *SHOWN_METRICS])))  # a run with no stats
    rows = frame.to_dict("records")
    varying = varying_fields([{name: row.get(name) for name in SETTING_FIELDS} for row in rows])
    view = pd.DataFrame({"#": frame["setting"],
                         "settings": [describe(row, varying) if varying else "—" for row in rows]})
    for column, header in SHOWN_METRICS.items():
        view[header] = frame[column]
    view["output"] = [" ".join(str(text).split()) for text in frame["output"]]
    return view[RESULT_COLUMNS]


def sweep_frame(settings: list[SamplingParams], frame: pd.DataFrame, logprobs: list[float | None]):
    """(swept field, one row per finished setting: its value and metrics) when exactly one field varies, else
    (None, None)."""
    varying = varying_fields([table_row(params) for params in settings])
    if len(settings) < 2 or len(varying) != 1:
        return None, None
    field = varying[0]
    metrics = frame.assign(mean_logprob=logprobs)
    rows = [{SWEPT_VALUE: getattr(params, field),
             **{label: metrics.iloc[index].get(column) for label, column in SWEEP_METRICS.items()}}
            for index, params in enumerate(settings) if pd.notna(metrics.iloc[index].get("new_tokens"))]
    points = pd.DataFrame(rows, columns=[SWEPT_VALUE, *SWEEP_METRICS]).sort_values(SWEPT_VALUE)
    return field, points.astype(float)


def write_csv(frame: pd.DataFrame) -> str:
    folder = Path(tempfile.mkdtemp(prefix="lab-"))
    path = folder / f"sampling-lab-{time.strftime('%Y%m%d-%H%M%S')}.csv"
    frame.to_csv(path, index=False)
    return str(path)


def save_run(storage: Storage | None, prompt: str, settings: list[SamplingParams], outputs: list[str],
             stats: list[Any], model: str | None = None) -> str | None:
    """Store a finished run with the cells that finished (when saving is on); returns its id.

    A storage problem is a warning: the results on screen and their CSV are still there.
    """
    if storage is None:
        return None
    cells = [LabCell(index, table_row(params), outputs[index],
                     {**stats[index].as_dict(), "summary": stats[index].summary()})
             for index, params in enumerate(settings) if stats[index] is not None]
    try:
        return storage.save_lab_run(prompt, cells, model=model,
                                    settings=[table_row(params) for params in settings])
    except StorageError as exc:
        gr.Warning(f"This run was not saved: {exc}")
        return None


@dataclass
class LabView:
    """The components a run writes. Runs yield dicts keyed by them: a component left out keeps what it shows
    (a refused run changes only the status line)."""

    texts: list[gr.Textbox]
    notes: list[gr.Markdown]
    cards: list[gr.Column]
    results: gr.Dataframe
    csv_file: gr.File
    status: gr.Markdown
    shared: gr.Markdown
    sweep_note: gr.Markdown
    sweep_plots: list[gr.LinePlot]
    results_box: gr.Column
    sweep_box: gr.Column
    details: gr.State

    def outputs(self) -> list:
        """In the order API clients see (layouts and the state are not sent to them): the 6 outputs, the 6 stats
        lines, the results table (12), its CSV (13), the status (14), the shared settings (15), the sweep's note
        (16) and its three plots (17-19)."""
        return [*self.texts, *self.notes, self.results, self.csv_file, self.status, self.shared, self.sweep_note,
                *self.sweep_plots, *self.cards, self.results_box, self.sweep_box, self.details]


def run_lab(manager: ModelManager, storage: Storage | None, view: LabView, prompt: str, table: Any,
            schema: str = "", request: gr.Request | None = None):
    """Run the prompt under each setting in turn (through the manager's queue), streaming into the cards.

    Nothing on screen changes until a setting starts: a run refused before that (by validation, or a refusal of
    every setting) leaves the previous results, their CSV and the Insight tab's cells as they were.
    """
    owner = session_owner(request)
    try:
        if not prompt or not str(prompt).strip():
            raise ParameterError("the prompt is empty", field="prompt")
        settings = settings_from_table(table)
        response_format = schema_from_text(schema)  # one schema, compared under every setting
    except PlaygroundError as exc:
        gr.Warning(str(exc))
        yield {view.status: f"⚠️ {exc}"}
        return
    labels, shared = setting_labels(settings)
    outputs = [""] * len(settings)
    stats: list[Any] = [None] * len(settings)
    lines = ["waiting"] * len(settings)
    details: list[dict[str, Any] | None] = [None] * len(settings)
    logprobs: list[float | None] = [None] * len(settings)

    def cells() -> dict:
        shown = {}
        for i in range(MAX_COLUMNS):
            used = i < len(settings)
            shown[view.texts[i]] = gr.update(value=outputs[i] if used else "", visible=used,
                                             label=labels[i] if used else f"Setting {i + 1}")
            shown[view.notes[i]] = gr.update(value=lines[i] if used else "", visible=used)
            shown[view.cards[i]] = gr.update(visible=used)
        return shown

    loaded = manager.loaded
    capture_routing = bool(loaded and loaded.has_experts)
    tokens: list[list[Any]] = [[] for _ in settings]
    requests = [dict(messages=[{"role": "user", "content": prompt}], params=params, logprobs=INSPECT_TOP,
                     capture_routing=capture_routing, response_format=response_format) for params in settings]
    # A local model runs the settings in turn; a remote engine gets them at once and batches them.
    events = manager.stream_each(requests, owner=owner)
    refused: list[str] = []
    started = False
    try:
        for index, event in events:
            if isinstance(event, PlaygroundError):
                lines[index] = f"⚠️ {event}"
                refused.append(str(event))
                yield {**(cells() if started else {}), view.status: f"⚠️ {event}"}
                continue
            first = {}
            if not started:  # the previous run's results make way for this one's
                started = True
                first = {view.results: None, view.csv_file: None, view.results_box: gr.update(visible=False),
                         view.sweep_box: gr.update(visible=False), view.shared: shared}
            tokens[index].extend(event.tokens)
            if event.kind == "queued":
                lines[index] = f"waiting: place {event.position}"
            elif event.kind == "delta":
                outputs[index] += event.text
                lines[index] = "generating…"
            elif event.kind == "done":
                outputs[index] = event.text
                stats[index] = event.stats
                token_state = tokens_to_state(tokens[index])
                logprobs[index] = mean_logprob(token_state)
                verdict = ""
                if response_format is not None and event.stats.finish_reason != "error":
                    outputs[index], verdict = checked_reply(event.text, response_format)  # pretty, and checked
                    verdict = f" · {verdict}"
                lines[index] = (f"{event.stats.summary()}{logprob_note(logprobs[index])}{verdict}"
                                if event.stats.finish_reason != "error" else f"⚠️ {event.stats.error}")
                details[index] = {"tokens": token_state,
                                  "routing": routing_to_state(event.routing, loaded.tokenizer if loaded else None)}
            running = sum(1 for line in lines if line == "generating…")
            progress = (f"Running setting {index + 1} of {len(settings)}" if running <= 1
                        else f"Running {running} of {len(settings)} settings at once")
            # the details state is written once per finished cell, not copied on every token
            yield {**first, **cells(), view.status: progress, **({view.details: details} if event.kind == "done" else {})}
            if event.kind == "done" and event.stats.finish_reason == "cancelled":
                break  # stopped: the settings after it are not run
    finally:
        events.close()
    if not started:  # every setting was refused: nothing ran, and what was on screen stays
        yield {view.status: f"⚠️ {refused[0]}"}
        return
    if all(s is None for s in stats):
        yield {**cells(), view.status: f"⚠️ {refused[0]}" if refused else "Nothing finished."}
        return
    save_run(storage, prompt, settings, outputs, stats, model=loaded.name if loaded else None)
    frame = results_frame(prompt, settings, outputs, stats)
    done = {**cells(), view.results: readable(results_view(frame, logprobs)), view.csv_file: write_csv(frame),
            view.results_box: gr.update(visible=True), view.shared: shared, view.details: details,
            view.status: f"Done: {sum(s is not None for s in stats)} of {len(settings)} settings"}
    field, points = sweep_frame(settings, frame, logprobs)
    if field is None or points.empty:
        yield {**done, view.sweep_box: gr.update(visible=False)}
        return
    values = ", ".join(str(getattr(params, field)) for params in settings)
    note = (f"**Sweep of {field}** over {values}: decode speed, reply length and mean log-probability per token "
            f"(under the model's own distribution; closer to 0 is more likely text) at each value.")
    yield {**done, view.sweep_note: note, **{plot: points for plot in view.sweep_plots},
           view.sweep_box: gr.update(visible=True)}


def logprob_note(value: float | None) -> str:
    return "" if value is None else f" · mean logprob {for_people(value)}"


@dataclass
class LabTab:
    """The lab's parts that other tabs use: Insight reads `details`, History reopens a saved run into the prompt
    and the settings table."""

    details: gr.State
    prompt: gr.Textbox
    table: gr.Dataframe


def build_lab_tab(manager: ModelManager, storage: Storage | None = None) -> LabTab:
    """The Sampling lab tab; finished runs are saved to `storage` (None: not saved)."""
    with gr.Tab("Sampling lab", id="lab"):
        gr.Markdown(
            "Run one prompt under several sampling settings side by side. Each row of the table is one setting "
            "(2–6 rows); the same seed and settings reproduce the same text."
        )
        prompt = gr.Textbox(label="Prompt", lines=3, value="Write a short poem about the sea.", elem_id="lab-prompt")
        with gr.Accordion("Structured output", open=False):
            schema = gr.Code(value="", language="json", lines=5, elem_id="lab-schema",
                             label="JSON Schema every setting's reply must match (empty: free text)")
        table = gr.Dataframe(
            value=default_settings(2), headers=SETTING_FIELDS, label="Settings (one row per column)",
            interactive=True, row_count=(2, "dynamic"), column_count=(len(SETTING_FIELDS), "fixed"),
            elem_id="lab-settings",
        )
        with gr.Row():
            preset = gr.Dropdown(preset_names(), value=None, label="Preset", info="put a preset's settings in a row")
            preset_row = gr.Number(value=1, precision=0, minimum=1, maximum=MAX_COLUMNS, label="Row")
            preset_button = gr.Button("Put preset in row")
        with gr.Row():
            sweep_parameter = gr.Dropdown(SETTING_FIELDS, value=EXAMPLE_FIELD.name, label="Sweep parameter")
            sweep_values = gr.Textbox(value=", ".join(map(str, EXAMPLE_FIELD.limits.example)),
                                      label="Values (comma separated)", elem_id="lab-sweep-values")
            sweep_button = gr.Button("Fill table with sweep")
        with gr.Row():
            run = gr.Button("Run", variant="primary", elem_id="lab-run")
            stop = gr.Button("Stop", variant="stop", elem_id="lab-stop")
        status = gr.Markdown("", elem_id="lab-status")
        shared = gr.Markdown("", elem_id="lab-shared")
        texts, notes, cards = [], [], []
        # The cards share the width: up to three a row (a fourth wraps), each at least a readable width.
        with gr.Row(equal_height=False, elem_id="lab-outputs"):
            for i in range(MAX_COLUMNS):
                with gr.Column(min_width=360, visible=False, elem_id=f"lab-card-{i + 1}") as card:
                    texts.append(gr.Textbox(label=f"Setting {i + 1}", lines=4, max_lines=16, interactive=False,
                                            elem_id=f"lab-output-{i + 1}"))
                    notes.append(gr.Markdown("", elem_id=f"lab-note-{i + 1}"))
                cards.append(card)
        # Hidden until a run has results: empty tables, plots and file boxes look broken.
        with gr.Column(visible=False, elem_id="lab-sweep") as sweep_box:
            sweep_note = gr.Markdown("", elem_id="lab-sweep-note")
            with gr.Row():
                # Fixed properties, new data only: a property changed with the data leaves the old chart drawn.
                sweep_plots = [gr.LinePlot(x=SWEPT_VALUE, y=metric, title=metric, height=240, min_width=240,
                                           x_axis_format="~g", y_axis_format="~g", elem_id=f"lab-sweep-{number}")
                               for number, metric in enumerate(SWEEP_METRICS, start=1)]
        with gr.Column(visible=False, elem_id="lab-results-box") as results_box:
            results = gr.Dataframe(headers=RESULT_COLUMNS, column_widths=RESULT_WIDTHS, interactive=False,
                                   label="Results (click a cell to read all of it; the CSV has every column)",
                                   elem_id="lab-results")
            csv_file = gr.File(label="Results as CSV", interactive=False, height=80, elem_id="lab-csv")
        details = gr.State([])  # per cell: tokens and routing for the Insight tab
        view = LabView(texts, notes, cards, results, csv_file, status, shared, sweep_note, sweep_plots, results_box,
                       sweep_box, details)

        def fill_sweep(table, parameter, values):
            try:
                return sweep_table(table, parameter, values), f"Sweep of {parameter}: {values}"
            except PlaygroundError as exc:
                gr.Warning(str(exc))
                return table, f"⚠️ {exc}"

        def stop_lab(request: gr.Request = None):
            owner = session_owner(request)
            return "Stopping…" if owner and manager.cancel(owner) else "Nothing is running."

        def put_preset(table, chosen, row):
            try:
                return preset_in_row(table, chosen, row), f"Row {int(row)}: preset {chosen}"
            except PlaygroundError as exc:
                gr.Warning(str(exc))
                return table, f"⚠️ {exc}"

        def run_and_save(prompt: str, table: Any, response_schema: str = "", request: gr.Request | None = None):
            yield from run_lab(manager, storage, view, prompt, table, response_schema, request)

        preset_button.click(put_preset, [table, preset, preset_row], [table, status], api_name="lab_preset_row")
        preset.focus(lambda current: gr.update(choices=preset_names(), value=current), preset, preset,
                     api_name=False, show_progress="hidden", queue=False)
        sweep_button.click(fill_sweep, [table, sweep_parameter, sweep_values], [table, status], api_name="lab_sweep")
        run.click(run_and_save, [prompt, table, schema], view.outputs(), api_name="lab_run", concurrency_limit=None)
        stop.click(stop_lab, None, status, api_name="lab_stop", queue=False)
        build_next_token_explorer(manager, prompt)
    return LabTab(details=details, prompt=prompt, table=table)
