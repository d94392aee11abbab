"""The next-token explorer (in the Sampling lab tab): one forward pass for a text, its next-token distribution as
a bar chart and a table, redrawn at once under the sampling settings, and a token appended to go on."""

from __future__ import annotations

import gradio as gr
import pandas as pd

from playground.errors import PlaygroundError
from playground.insight import MAX_EXPLORER_TOP, explore_distribution, explorer_summary, readable
from playground.manager import ModelManager
from playground.params import DISTRIBUTION_FIELDS, SAMPLING_FIELDS, SamplingParams
from playground.ui.controls import session_owner

EXPLORER_COLOURS = {"kept": "#3b82f6", "cut": "#d1d5db"}
CHART_COLUMNS = ["label", "bar", "status", "token", "model p", "sampled p"]
TABLE_COLUMNS = ["rank", "token", "id", "model p", "sampled p", "status"]


def nothing_drawn(message: str):
    """(chart, table, token choices, summary, results box) when there is nothing to draw: the box hides."""
    return None, None, gr.update(choices=[], value=None), message, gr.update(visible=False)


class NextTokenExplorer:
    """The explorer's handlers, over the app's model manager (bound methods: Gradio reads their parameters)."""

    def __init__(self, manager: ModelManager):
        self.manager = manager

    def draw_distribution(self, forward: dict | None, top_n, **settings):
        """(bar chart frame, table, token choices, summary, results box) for the stored forward pass under these
        settings.

        No model run: the distribution is redrawn from the stored logits, on a short-lived thread (manager.compute).
        The chart gets only new data, never new properties: a property change makes Gradio's plot re-render while the
        data arrive, and it then kept the previous tokens (its bars are sorted by their zero-padded rank label).
        """
        if not forward:
            return nothing_drawn("Enter text and press **Next tokens** first.")
        try:
            params = SamplingParams.from_form(settings)
            tokenizer = self.manager.require_model().tokenizer
        except PlaygroundError as exc:
            return nothing_drawn(f"⚠️ {exc}")
        frame = self.manager.compute(
            lambda: explore_distribution(forward["logits"], forward["prompt_ids"], params, tokenizer, int(top_n))
        )
        choices = [(label, int(token_id)) for label, token_id in zip(frame["label"], frame["id"])]
        return (frame[CHART_COLUMNS], readable(frame[TABLE_COLUMNS]), gr.update(choices=choices, value=None),
                explorer_summary(frame, params), gr.update(visible=True))


    def next_tokens(self, text, request: gr.Request = None, top_n=20, **settings):
        """One forward pass for `text` (queued like any generation), then the distribution under the settings."""
        if not text or not str(text).strip():
            return (*nothing_drawn("⚠️ The text is empty."), None)
        try:
            prompt_ids, logits = self.manager.next_token_logits(prompt=str(text),
                                                                owner=session_owner(request))
        except PlaygroundError as exc:
            return (*nothing_drawn(f"⚠️ {exc}"), None)
        forward = {"text": str(text), "prompt_ids": prompt_ids, "logits": logits}
        return (*self.draw_distribution(forward, top_n, **settings), forward)


    def append_token(self, forward: dict | None, token_id) -> str | gr.update:
        """The explored text with the chosen token's text appended (the caller then explores again)."""
        if not forward or token_id in (None, ""):
            return gr.update()
        return forward["text"] + self.manager.require_model().tokenizer.decode([int(token_id)])


def build_next_token_explorer(manager: ModelManager, lab_prompt: gr.Textbox) -> None:
    explorer = NextTokenExplorer(manager)
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
                                step=SAMPLING_FIELDS[name].limits.step, label=SAMPLING_FIELDS[name].label)
                for name in DISTRIBUTION_FIELDS
            }
            top_n = gr.Slider(5, MAX_EXPLORER_TOP, value=20, step=1, label="tokens shown")
        summary = gr.Markdown("", elem_id="explorer-summary")
        # Hidden until a forward pass has something to show: an empty chart and table look broken.
        with gr.Column(visible=False, elem_id="explorer-found") as found:
            chart = gr.BarPlot(x="label", y="bar", color="status", color_map=EXPLORER_COLOURS, x_title="next token",
                               y_title="probability", tooltip=["token", "model p", "sampled p", "status"],
                               x_label_angle=-45, height=360, sort="x", elem_id="explorer-chart")
            with gr.Row():
                choice = gr.Dropdown([], label="Append a token", scale=3, elem_id="explorer-choice")
                append = gr.Button("Append", scale=1, elem_id="explorer-append")
            table = gr.Dataframe(headers=TABLE_COLUMNS, label="Top tokens (click a row to append it)",
                                 interactive=False, elem_id="explorer-table")
        forward = gr.State(None)  # the last forward pass: text, prompt ids, logits [vocab]

        drawn = [chart, table, choice, summary, found]  # the box is a layout: API clients get the first four
        shown = {**settings, "top_n": top_n}  # passed by name: API clients see each setting's name

        def prompt_in_chat_format(prompt):
            try:
                return manager.build_prompt([{"role": "user", "content": prompt or ""}])
            except PlaygroundError as exc:
                gr.Warning(str(exc))
                return gr.update()

        def append_row(state, shown, event: gr.SelectData):
            row = event.index[0] if isinstance(event.index, (list, tuple)) else event.index
            frame = shown if isinstance(shown, pd.DataFrame) else pd.DataFrame(shown)
            if state is None or frame.empty or "id" not in frame or not 0 <= row < len(frame):
                return gr.update()
            return explorer.append_token(state, int(frame.iloc[row]["id"]))

        use_prompt.click(prompt_in_chat_format, lab_prompt, text, api_name="explore_chat_prompt")
        go.click(explorer.next_tokens, [text], [*drawn, forward], inputs_kwargs=shown, api_name="explore")
        text.submit(explorer.next_tokens, [text], [*drawn, forward], inputs_kwargs=shown, api_name=False)
        for control in [*settings.values(), top_n]:
            control.change(explorer.draw_distribution, [forward], drawn, inputs_kwargs=shown, api_name=False,
                           show_progress="hidden", trigger_mode="always_last")
        # A visible endpoint for the same redraw (the e2e test and API users change settings through it).
        redraw = gr.Button(visible=False)
        redraw.click(explorer.draw_distribution, [forward], drawn, inputs_kwargs=shown, api_name="explore_redraw")
        append.click(explorer.append_token, [forward, choice], text, api_name="explore_append").then(
            explorer.next_tokens, [text], [*drawn, forward], inputs_kwargs=shown, api_name=False)
        table.select(append_row, [forward, table], text, api_name=False).then(
            explorer.next_tokens, [text], [*drawn, forward], inputs_kwargs=shown, api_name=False)
