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
from playground.generation.events import FINISH_SHORT
from playground.insight import INSPECT_TOP, for_people, readable
from playground.manager import ModelManager
from playground.params import EXAMPLE_BASE, EXAMPLE_FIELD, NUMERIC_FIELDS, SAMPLING_FIELDS, SamplingParams
from playground.presets import load_presets
from playground.structured import schema_from_text
from playground.storage import Storage
from playground.storage_exchange import LabCell, StorageError, result_row
from playground.ui.controls import preset_names, refresh_choices_on_focus, refusal, session_owner
from playground.ui.explorer import build_next_token_explorer
from playground.ui.replies import ClearableReplies, StreamedReply, UpdatePacer

MAX_COLUMNS = 6
# Cards share a row's width, three to a row at most; four make two rows of two (2 x 2 reads better than 3 and a
# full-width fourth). Hidden cards are not in the page, so the selector counts the shown ones.
LAB_CSS = """
#lab-outputs > [id^="lab-card-"] { flex: 1 1 calc(33.3% - var(--layout-gap)); }
#lab-outputs:has(> [id^="lab-card-"]:nth-child(4):last-child) > [id^="lab-card-"] {
  flex-basis: calc(50% - var(--layout-gap));
}
"""
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


def with_another_setting(table: Any) -> pd.DataFrame:
    """The settings table with one more row: a copy of the last, to change (MAX_COLUMNS rows at most)."""
    current = settings_from_table(table)
    if len(current) >= MAX_COLUMNS:
        raise ParameterError(f"the lab runs at most {MAX_COLUMNS} settings at once")
    return pd.DataFrame([table_row(p) for p in [*current, current[-1]]], columns=SETTING_FIELDS)


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


def results_frame(prompt: str, settings: list[SamplingParams], outputs: list[str],
                  stats: list[dict[str, Any] | None]) -> pd.DataFrame:
    """Every parameter and metric of a run, one row per setting (`result_row`): the CSV's columns. `stats`: each
    setting's `cell_stats`, None for one that never ran."""
    return pd.DataFrame([result_row(number, table_row(params), prompt, text, cell)
                         for number, (params, text, cell) in enumerate(zip(settings, outputs, stats), start=1)])


def cell_stats(reply: StreamedReply) -> dict[str, Any] | None:
    """What is kept of a finished setting's reply (in the CSV, and saved with the run): its stats, their line and its
    mean log-probability."""
    if reply.stats is None:
        return None
    return {**reply.stats.as_dict(), "summary": reply.stats.summary(), "mean_logprob": reply.mean_logprob}


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


def results_view(frame: pd.DataFrame) -> pd.DataFrame:
    """The results table as shown: the setting's number, the settings that differ between rows (the rest are said
    once above the outputs), the metrics under short headers and the output on one line."""
    frame = frame.reindex(columns=list(dict.fromkeys([*frame.columns, *SHOWN_METRICS])))  # a run with no stats
    rows = frame.to_dict("records")
    varying = varying_fields([{name: row.get(name) for name in SETTING_FIELDS} for row in rows])
    view = pd.DataFrame({"#": frame["setting"],
                         "settings": [describe(row, varying) if varying else "—" for row in rows]})
    for column, header in SHOWN_METRICS.items():
        view[header] = frame[column]
    view[SHOWN_METRICS["finish_reason"]] = frame["finish_reason"].map(lambda reason: FINISH_SHORT.get(reason, reason))
    view["output"] = [" ".join(str(text).split()) for text in frame["output"]]
    return view[RESULT_COLUMNS]


def sweep_frame(settings: list[SamplingParams], frame: pd.DataFrame):
    """(swept field, one row per finished setting: its value and metrics) when exactly one field varies, else
    (None, None)."""
    varying = varying_fields([table_row(params) for params in settings])
    if len(settings) < 2 or len(varying) != 1:
        return None, None
    field = varying[0]
    metrics = frame.reindex(columns=list(dict.fromkeys([*frame.columns, *SWEEP_METRICS.values()])))
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
             stats: list[dict[str, Any] | None], model: str | None = None) -> str | None:
    """Store a finished run with the cells that finished (`cell_stats`, when saving is on); returns its id.

    A storage problem is a warning: the results on screen and their CSV are still there.
    """
    if storage is None:
        return None
    cells = [LabCell(index, table_row(params), outputs[index], stats[index])
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
    try:
        if not prompt or not str(prompt).strip():
            raise ParameterError("the prompt is empty", field="prompt")
        settings = settings_from_table(table)
        response_format = schema_from_text(schema)  # one schema, compared under every setting
    except PlaygroundError as exc:
        yield {view.status: refusal(exc)}
        return
    labels, shared = setting_labels(settings)
    loaded = manager.loaded
    replies = [StreamedReply(response_format, loaded.tokenizer if loaded else None) for _ in settings]

    def cells() -> dict:
        return cards_updates(view, labels, [reply.text for reply in replies], [card_note(reply) for reply in replies])

    capture_routing = bool(loaded and loaded.has_experts)
    requests = [dict(messages=[{"role": "user", "content": prompt}], params=params, logprobs=INSPECT_TOP,
                     capture_routing=capture_routing, response_format=response_format) for params in settings]
    # A local model runs the settings in turn; a remote engine gets them at once and batches them.
    events = manager.stream_each(requests, owner=session_owner(request))
    refused: list[str] = []
    started = stopped = False
    pacer = UpdatePacer()  # one for all the cards: each update redraws them all
    try:
        for index, event in events:
            if isinstance(event, PlaygroundError):
                replies[index].line = f"⚠️ {event}"
                refused.append(str(event))
                yield {**(cells() if started else {}), view.status: f"⚠️ {event}"}
                continue
            first = {}
            if not started:  # the previous run's results make way for this one's
                started = True
                first = {view.results: None, view.csv_file: None, view.results_box: gr.update(visible=False),
                         view.sweep_box: gr.update(visible=False), view.shared: shared}
            replies[index].take(event)
            if not (first or pacer.due(event)):
                continue  # its text shows with the next update
            running = sum(reply.generating for reply in replies)
            progress = (f"Running setting {index + 1} of {len(settings)}" if running <= 1
                        else f"Running {running} of {len(settings)} settings at once")
            done = event.kind == "done"
            # the details state is written once per finished cell, not copied on every token
            yield {**first, **cells(), view.status: progress,
                   **({view.details: [reply.details for reply in replies]} if done else {})}
            if done and event.stats.finish_reason == "cancelled":
                stopped = True
                break  # stopped: the settings after it are not run
    finally:
        events.close()
    if not started:  # every setting was refused: nothing ran, and what was on screen stays
        yield {view.status: f"⚠️ {refused[0]}"}
        return
    for reply in replies:  # a card never says "waiting" once the run is over
        if reply.stats is None and not reply.line.startswith("⚠️"):
            reply.line = "Not run: the run was stopped" if stopped else "Not run"
    stats = [cell_stats(reply) for reply in replies]
    if all(s is None for s in stats):
        yield {**cells(), view.status: f"⚠️ {refused[0]}" if refused else "Nothing finished."}
        return
    outputs = [reply.text for reply in replies]
    save_run(storage, prompt, settings, outputs, stats, model=loaded.name if loaded else None)
    finished = sum(s is not None for s in stats)
    yield {**cells(), **results_updates(view, prompt, settings, outputs, stats), view.shared: shared,
           view.details: [reply.details for reply in replies],
           view.status: f"Done: {finished} of {len(settings)} settings" + (" (stopped)" if stopped else "")}


def results_updates(view: LabView, prompt: str, settings: list[SamplingParams], outputs: list[str],
                    stats: list[dict[str, Any] | None]) -> dict:
    """A finished run's results: the table, its CSV and (one field swept, two points at least) the sweep's charts."""
    frame = results_frame(prompt, settings, outputs, stats)
    shown = {view.results: readable(results_view(frame)), view.csv_file: write_csv(frame),
             view.results_box: gr.update(visible=True)}
    field, points = sweep_frame(settings, frame)
    if field is None or len(points) < 2:  # a chart needs two points; a stopped sweep may have fewer
        return {**shown, view.sweep_box: gr.update(visible=False)}
    values = ", ".join(str(getattr(params, field)) for params in settings)
    note = (f"**Sweep of {field}** over {values}: decode speed, reply length and mean log-probability per token "
            f"(under the model's own distribution; closer to 0 is more likely text) at each value.")
    label = SAMPLING_FIELDS[field].label
    return {**shown, view.sweep_note: note,
            **{plot: gr.update(value=points, x_title=label) for plot in view.sweep_plots},
            view.sweep_box: gr.update(visible=True)}


def saved_run_updates(view: LabView, run) -> dict:
    """A saved run (storage's LabRun) shown in the lab as when it finished: its cards, results and sweep. The Insight
    tab's token details are not saved, so none are shown for it."""
    try:
        settings = [SamplingParams.from_form(row) for row in run.settings]
    except ParameterError as exc:  # saved by another version: the prompt and table are back, the results say why
        return {view.status: f"⚠️ This run's results cannot be shown: {exc}"}
    cells = {cell.setting_index: cell for cell in run.cells}
    outputs = [cells[i].output if i in cells else "" for i in range(len(settings))]
    stats = [cells[i].stats if i in cells else None for i in range(len(settings))]
    labels, shared = setting_labels(settings)
    notes = [cell.get("summary", "") + logprob_note(cell.get("mean_logprob")) if cell else "Not run" for cell in stats]
    finished = sum(s is not None for s in stats)
    return {**cards_updates(view, labels, outputs, notes), **results_updates(view, run.prompt, settings, outputs, stats),
            view.shared: shared,
            view.details: [None] * len(settings),
            view.status: f"Saved run of {time.strftime('%Y-%m-%d %H:%M', time.localtime(run.created))}: "
                         f"{finished} of {len(settings)} settings finished. Press **Run** to run it again."}


def cards_updates(view: LabView, labels: list[str], texts: list[str], notes: list[str]) -> dict:
    """The output cards: one per setting (its label, text and the line under it), the rest hidden."""
    shown = {}
    for i in range(MAX_COLUMNS):
        used = i < len(texts)
        shown[view.texts[i]] = gr.update(value=texts[i] if used else "", visible=used,
                                         label=labels[i] if used else f"Setting {i + 1}")
        shown[view.notes[i]] = gr.update(value=notes[i] if used else "", visible=used)
        shown[view.cards[i]] = gr.update(visible=used)
    return shown


def card_note(reply: StreamedReply) -> str:
    """The line under a card: where the reply is, or its stats (with its mean log-probability) when done."""
    if reply.stats is None or reply.failed:
        return reply.line
    return reply.line + logprob_note(reply.mean_logprob)


def logprob_note(value: float | None) -> str:
    return "" if value is None else f" · mean logprob {for_people(value)}"


@dataclass
class LabTab:
    """The lab's parts that other tabs use: Insight reads `details`, History reopens a saved run into the prompt
    and the settings table."""

    details: gr.State
    prompt: gr.Textbox
    table: gr.Dataframe
    view: LabView

    def show_saved_run_after(self, event, storage: Storage | None, run_id: gr.components.Component) -> None:
        """After `event` has put saved run `run_id`'s prompt and settings in the lab: its results too."""

        def saved(chosen):
            try:
                run = storage.load_run(chosen) if storage is not None and chosen else None
            except StorageError:
                run = None
            return saved_run_updates(self.view, run) if run is not None else {}

        event.then(saved, run_id, self.view.outputs(), api_name=False, show_progress="hidden")


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
            add_setting = gr.Button("Add a setting", size="sm", scale=0, min_width=140, elem_id="lab-add-setting")
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
            stop = gr.Button("Stop", variant="secondary", interactive=False, elem_id="lab-stop")  # red while running
        status = gr.Markdown("", elem_id="lab-status")
        shared = gr.Markdown("", elem_id="lab-shared")
        texts, notes, cards = [], [], []
        # The cards share the width, three a row at most and all of one width (four make two rows of two: LAB_CSS).
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
                # Counts and speeds from zero, so a small difference does not look like a large one.
                sweep_plots = [gr.LinePlot(x=SWEPT_VALUE, y=metric, title=metric, height=240, min_width=240,
                                           x_axis_format="~g", y_axis_format="~g", elem_id=f"lab-sweep-{number}",
                                           y_lim=None if metric == "mean logprob" else [0, None],
                                           tooltip=[SWEPT_VALUE, metric])
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
                return table, refusal(exc)

        runs = ClearableReplies(manager)  # Stop answers after the run's last update (its own line says it stopped)

        def stop_lab(request: gr.Request = None):
            return gr.skip() if runs.stop(session_owner(request)) else "Nothing is running."

        def add_row(table):
            try:
                grown = with_another_setting(table)
            except PlaygroundError as exc:
                return table, refusal(exc)
            return grown, f"Setting {len(grown)} added: a copy of the one before, to change."

        def put_preset(table, chosen, row):
            try:
                return preset_in_row(table, chosen, row), f"Row {int(row)}: preset {chosen}"
            except PlaygroundError as exc:
                return table, refusal(exc)

        @runs.clearable
        def run_and_save(prompt: str, table: Any, response_schema: str = "", request: gr.Request | None = None):
            yield from run_lab(manager, storage, view, prompt, table, response_schema, request)

        preset_button.click(put_preset, [table, preset, preset_row], [table, status], api_name="lab_preset_row")
        add_setting.click(add_row, table, [table, status], api_name="lab_add_setting")
        refresh_choices_on_focus(preset, preset_names)
        sweep_button.click(fill_sweep, [table, sweep_parameter, sweep_values], [table, status], api_name="lab_sweep")
        run.click(lambda: (gr.update(interactive=False), gr.update(interactive=True, variant="stop")), None,
                  [run, stop], api_name=False, queue=False, show_progress="hidden")
        run.click(run_and_save, [prompt, table, schema], view.outputs(), api_name="lab_run",
                  concurrency_limit=None).then(
            lambda: (gr.update(interactive=True), gr.update(interactive=False, variant="secondary")), None,
            [run, stop], api_name=False, show_progress="hidden")
        stop.click(stop_lab, None, status, api_name="lab_stop", queue=False)
        build_next_token_explorer(manager, prompt)
    return LabTab(details=details, prompt=prompt, table=table, view=view)
