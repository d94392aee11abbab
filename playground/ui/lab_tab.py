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
from playground.insight import (
    INSPECT_TOP,
    MAX_EXPLORER_TOP,
    explore_distribution,
    explorer_summary,
    routing_to_state,
    tokens_to_state,
)
from playground.manager import get_manager
from playground.params import DISTRIBUTION_FIELDS, EXAMPLE_BASE, EXAMPLE_FIELD, NUMERIC_FIELDS, SAMPLING_FIELDS, SamplingParams
from playground.presets import load_presets
from playground.storage import LabCell, Storage, StorageError
from playground.ui.controls import preset_names

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
    rows = []
    for number, (params, text, result) in enumerate(zip(settings, outputs, stats), start=1):
        row = {"setting": number, **table_row(params)}
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


def save_run(storage: Storage | None, prompt: str, settings: list[SamplingParams], outputs: list[str],
             stats: list[Any]) -> str | None:
    """Store a finished run with the cells that finished (when saving is on); returns its id.

    A storage problem is a warning: the results on screen and their CSV are still there.
    """
    if storage is None:
        return None
    loaded = get_manager().loaded
    cells = [LabCell(index, table_row(params), outputs[index],
                     {**stats[index].as_dict(), "summary": stats[index].summary()})
             for index, params in enumerate(settings) if stats[index] is not None]
    try:
        return storage.save_lab_run(prompt, cells, model=loaded.name if loaded else None,
                                    settings=[table_row(params) for params in settings])
    except StorageError as exc:
        gr.Warning(f"This run was not saved: {exc}")
        return None


def run_lab(storage: Storage | None, prompt: str, table: Any, request: gr.Request | None = None):
    """Run the prompt under each setting in turn (through the manager's queue), streaming into the cells.

    The last output is the cells' details (tokens, routing) for the Insight tab; it goes to a State, which
    API clients do not see.
    """
    owner = getattr(request, "session_hash", None)
    empty_cells = [gr.update(value="", visible=False)] * MAX_COLUMNS + [gr.update(value="", visible=False)] * MAX_COLUMNS
    try:
        if not prompt or not str(prompt).strip():
            raise ParameterError("the prompt is empty", field="prompt")
        settings = settings_from_table(table)
    except PlaygroundError as exc:
        gr.Warning(str(exc))
        yield (*empty_cells, None, None, f"⚠️ {exc}", [])
        return
    outputs = [""] * len(settings)
    stats: list[Any] = [None] * len(settings)
    lines = ["waiting"] * len(settings)
    details: list[dict[str, Any] | None] = [None] * len(settings)

    def cells():
        texts = [gr.update(value=outputs[i], visible=True, label=f"Setting {i + 1}") if i < len(settings)
                 else gr.update(value="", visible=False) for i in range(MAX_COLUMNS)]
        notes = [gr.update(value=lines[i], visible=True) if i < len(settings) else gr.update(value="", visible=False)
                 for i in range(MAX_COLUMNS)]
        return texts + notes

    manager = get_manager()
    loaded = manager.loaded
    capture_routing = bool(loaded and loaded.has_experts)
    tokens: list[list[Any]] = [[] for _ in settings]
    requests = [dict(messages=[{"role": "user", "content": prompt}], params=params, logprobs=INSPECT_TOP,
                     capture_routing=capture_routing) for params in settings]
    # A local model runs the settings in turn; a remote engine gets them at once and batches them.
    events = manager.stream_each(requests, owner=owner)
    refused: list[str] = []
    try:
        for index, event in events:
            if isinstance(event, PlaygroundError):
                lines[index] = f"⚠️ {event}"
                refused.append(str(event))
                yield (*cells(), None, None, f"⚠️ {event}", details)
                continue
            tokens[index].extend(event.tokens)
            if event.kind == "queued":
                lines[index] = f"waiting: place {event.position}"
            elif event.kind == "delta":
                outputs[index] += event.text
                lines[index] = "generating…"
            elif event.kind == "done":
                outputs[index] = event.text
                stats[index] = event.stats
                lines[index] = event.stats.summary() if event.stats.finish_reason != "error" else f"⚠️ {event.stats.error}"
                details[index] = {"tokens": tokens_to_state(tokens[index]),
                                  "routing": routing_to_state(event.routing, loaded.tokenizer if loaded else None)}
            running = sum(1 for line in lines if line == "generating…")
            progress = (f"Running setting {index + 1} of {len(settings)}" if running <= 1
                        else f"Running {running} of {len(settings)} settings at once")
            # the details state is written once per finished cell, not copied on every token
            yield (*cells(), None, None, progress, details if event.kind == "done" else gr.skip())
            if event.kind == "done" and event.stats.finish_reason == "cancelled":
                break  # stopped: the settings after it are not run
    finally:
        events.close()
    if refused and all(s is None for s in stats):
        yield (*cells(), None, None, f"⚠️ {refused[0]}", details)  # nothing ran: nothing to save or tabulate
        return
    save_run(storage, prompt, settings, outputs, stats)
    frame = results_frame(prompt, settings, outputs, stats)
    yield (*cells(), frame, write_csv(frame), f"Done: {sum(s is not None for s in stats)} of {len(settings)} settings",
           details)


def build_lab_tab(storage: Storage | None = None):
    """The Sampling lab tab; finished runs are saved to `storage` (None: not saved)."""
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
            preset = gr.Dropdown(preset_names(), value=None, label="Preset", info="put a preset's settings in a row")
            preset_row = gr.Number(value=1, precision=0, minimum=1, maximum=MAX_COLUMNS, label="Row")
            preset_button = gr.Button("Put preset in row")
        with gr.Row():
            sweep_parameter = gr.Dropdown(SETTING_FIELDS, value=EXAMPLE_FIELD.name, label="Sweep parameter")
            sweep_values = gr.Textbox(value=", ".join(map(str, EXAMPLE_FIELD.limits.example)),
                                      label="Values (comma separated)")
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
        details = gr.State([])  # per cell: tokens and routing for the Insight tab

        def fill_sweep(table, parameter, values):
            try:
                return sweep_table(table, parameter, values), f"Sweep of {parameter}: {values}"
            except PlaygroundError as exc:
                gr.Warning(str(exc))
                return table, f"⚠️ {exc}"

        def stop_lab(request: gr.Request = None):
            owner = getattr(request, "session_hash", None)
            return "Stopping…" if owner and get_manager().cancel(owner) else "Nothing is running."

        def put_preset(table, chosen, row):
            try:
                return preset_in_row(table, chosen, row), f"Row {int(row)}: preset {chosen}"
            except PlaygroundError as exc:
                gr.Warning(str(exc))
                return table, f"⚠️ {exc}"

        preset_button.click(put_preset, [table, preset, preset_row], [table, status], api_name="lab_preset_row")
        preset.focus(lambda current: gr.update(choices=preset_names(), value=current), preset, preset,
                     api_name=False, show_progress="hidden", queue=False)
        sweep_button.click(fill_sweep, [table, sweep_parameter, sweep_values], [table, status], api_name="lab_sweep")
        def run_and_save(prompt: str, table: Any, request: gr.Request | None = None):
            yield from run_lab(storage, prompt, table, request)

        run.click(run_and_save, [prompt, table], [*texts, *notes, results, csv_file, status, details], api_name="lab_run",
                  concurrency_limit=None)
        stop.click(stop_lab, None, status, api_name="lab_stop", queue=False)
        build_next_token_explorer(prompt)
    return details


# ------------------------------------------------------------------------------------- next-token explorer

EXPLORER_COLOURS = {"kept": "#3b82f6", "cut": "#d1d5db"}


def draw_distribution(forward: dict | None, top_n, **settings):
    """(bar chart frame, table, token choices, summary) for the stored forward pass under these settings.

    No model run: the distribution is redrawn from the stored logits, on a short-lived thread (manager.compute).
    """
    if not forward:
        return None, None, gr.update(choices=[], value=None), "Enter text and press **Next tokens** first."
    try:
        params = SamplingParams.from_form(settings)
        tokenizer = get_manager().require_model().tokenizer
    except PlaygroundError as exc:
        return None, None, gr.update(choices=[], value=None), f"⚠️ {exc}"
    frame = get_manager().compute(
        lambda: explore_distribution(forward["logits"], forward["prompt_ids"], params, tokenizer, int(top_n))
    )
    chart = gr.BarPlot(value=frame[["label", "bar", "status", "token", "model p", "sampled p"]], sort=list(frame["label"]))
    table = frame[["rank", "token", "id", "model p", "sampled p", "status"]]
    choices = [(label, int(token_id)) for label, token_id in zip(frame["label"], frame["id"])]
    return chart, table, gr.update(choices=choices, value=None), explorer_summary(frame, params)


def next_tokens(text, request: gr.Request = None, top_n=20, **settings):
    """One forward pass for `text` (queued like any generation), then the distribution under the settings."""
    if not text or not str(text).strip():
        return None, None, gr.update(choices=[], value=None), "⚠️ The text is empty.", None
    try:
        prompt_ids, logits = get_manager().next_token_logits(prompt=str(text), owner=getattr(request, "session_hash", None))
    except PlaygroundError as exc:
        return None, None, gr.update(choices=[], value=None), f"⚠️ {exc}", None
    forward = {"text": str(text), "prompt_ids": prompt_ids, "logits": logits}
    return (*draw_distribution(forward, top_n, **settings), forward)


def append_token(forward: dict | None, token_id) -> str | gr.update:
    """The explored text with the chosen token's text appended (the caller then explores again)."""
    if not forward or token_id in (None, ""):
        return gr.update()
    return forward["text"] + get_manager().require_model().tokenizer.decode([int(token_id)])


def build_next_token_explorer(lab_prompt: gr.Textbox) -> None:
    with gr.Accordion("Next-token explorer", open=False):
        gr.Markdown(
            "The model's most likely next tokens for a text, from one forward pass. Moving a setting redraws the "
            "chart at once: blue bars are what the settings keep (their probability after the settings), grey bars "
            "are tokens the settings cut (drawn at the model's own probability). Pick a token (list or table row) "
            "to append it and see the next distribution. The text is fed to the model as is: use the button to "
            "wrap the lab prompt in the model's chat format."
        )
        text = gr.Textbox(label="Text the model continues", lines=3, elem_id="explorer-text")
        with gr.Row():
            use_prompt = gr.Button("Use the lab prompt (chat format)", size="sm")
            go = gr.Button("Next tokens", variant="primary", elem_id="explorer-go")
        with gr.Row():
            # Sliders here: moving one redraws at once. Their ranges are the useful part of each field's range.
            settings = {
                name: gr.Slider(*SAMPLING_FIELDS[name].limits.slider, value=SAMPLING_FIELDS[name].default,
                                step=SAMPLING_FIELDS[name].limits.step, label=name)
                for name in DISTRIBUTION_FIELDS
            }
            top_n = gr.Slider(5, MAX_EXPLORER_TOP, value=20, step=1, label="tokens shown")
        summary = gr.Markdown("", elem_id="explorer-summary")
        chart = gr.BarPlot(x="label", y="bar", color="status", color_map=EXPLORER_COLOURS, x_title="next token",
                           y_title="probability", tooltip=["token", "model p", "sampled p", "status"],
                           x_label_angle=-45, height=360, elem_id="explorer-chart")
        with gr.Row():
            choice = gr.Dropdown([], label="Append a token", scale=3)
            append = gr.Button("Append", scale=1)
        table = gr.Dataframe(label="Top tokens (click a row to append it)", interactive=False, elem_id="explorer-table")
        forward = gr.State(None)  # the last forward pass: text, prompt ids, logits [vocab]

        drawn = [chart, table, choice, summary]
        shown = {**settings, "top_n": top_n}  # passed by name: API clients see each setting's name

        def prompt_in_chat_format(prompt):
            try:
                return get_manager().build_prompt([{"role": "user", "content": prompt or ""}])
            except PlaygroundError as exc:
                gr.Warning(str(exc))
                return gr.update()

        def append_row(state, shown, event: gr.SelectData):
            row = event.index[0] if isinstance(event.index, (list, tuple)) else event.index
            frame = shown if isinstance(shown, pd.DataFrame) else pd.DataFrame(shown)
            if state is None or frame.empty or "id" not in frame or not 0 <= row < len(frame):
                return gr.update()
            return append_token(state, int(frame.iloc[row]["id"]))

        use_prompt.click(prompt_in_chat_format, lab_prompt, text, api_name="explore_chat_prompt")
        go.click(next_tokens, [text], [*drawn, forward], inputs_kwargs=shown, api_name="explore")
        text.submit(next_tokens, [text], [*drawn, forward], inputs_kwargs=shown, api_name=False)
        for control in [*settings.values(), top_n]:
            control.change(draw_distribution, [forward], drawn, inputs_kwargs=shown, api_name=False,
                           show_progress="hidden", trigger_mode="always_last")
        # A visible endpoint for the same redraw (the e2e test and API users change settings through it).
        redraw = gr.Button(visible=False)
        redraw.click(draw_distribution, [forward], drawn, inputs_kwargs=shown, api_name="explore_redraw")
        append.click(append_token, [forward, choice], text, api_name="explore_append").then(
            next_tokens, [text], [*drawn, forward], inputs_kwargs=shown, api_name=False)
        table.select(append_row, [forward, table], text, api_name=False).then(
            next_tokens, [text], [*drawn, forward], inputs_kwargs=shown, api_name=False)
