"""Sampling controls shared by the tabs, and turning their values into validated SamplingParams."""

from __future__ import annotations

from typing import Any

import gradio as gr

from playground.params import RANGES, SamplingParams

# The order the controls are created and passed to event functions.
PARAM_FIELDS = [
    "temperature", "top_p", "top_k", "min_p", "typical_p",
    "repetition_penalty", "no_repeat_ngram_size", "max_new_tokens", "seed", "stop",
]


def sampling_controls(defaults: SamplingParams | None = None, open: bool = False) -> list[gr.components.Component]:
    """The sampling controls in an accordion; returns them in PARAM_FIELDS order."""
    d = defaults or SamplingParams()
    info = {name: words for name, (_, _, words) in RANGES.items()}
    with gr.Accordion("Sampling", open=open):
        with gr.Row():
            temperature = gr.Slider(0, 2, value=d.temperature, step=0.05, label="temperature", info=info["temperature"])
            top_p = gr.Slider(0.01, 1, value=d.top_p, step=0.01, label="top_p")
            top_k = gr.Slider(0, 200, value=d.top_k, step=1, label="top_k", info="0 turns it off")
        with gr.Row():
            min_p = gr.Slider(0, 1, value=d.min_p, step=0.01, label="min_p", info="0 turns it off")
            typical_p = gr.Slider(0.01, 1, value=d.typical_p, step=0.01, label="typical_p", info="1 turns it off")
            repetition_penalty = gr.Slider(0.5, 2, value=d.repetition_penalty, step=0.01, label="repetition_penalty")
        with gr.Row():
            no_repeat = gr.Slider(0, 10, value=d.no_repeat_ngram_size, step=1, label="no_repeat_ngram_size")
            max_new_tokens = gr.Slider(1, 2048, value=d.max_new_tokens, step=1, label="max_new_tokens")
            seed = gr.Number(value=d.seed, precision=0, label="seed", info="empty: a new random seed each time")
        stop = gr.Textbox(value="\n".join(d.stop), lines=2, label="stop strings", info="one per line; \\n means a newline")
    return [temperature, top_p, top_k, min_p, typical_p, repetition_penalty, no_repeat, max_new_tokens, seed, stop]


def params_from_controls(values: list[Any] | tuple[Any, ...]) -> SamplingParams:
    """Control values (PARAM_FIELDS order) -> SamplingParams; raises ParameterError naming the field."""
    raw = dict(zip(PARAM_FIELDS, values))
    stop = raw.get("stop")
    if isinstance(stop, str):
        raw["stop"] = [line.replace("\\n", "\n") for line in stop.splitlines() if line]
    if raw.get("seed") in ("", None):
        raw["seed"] = None
    for name in ("top_k", "no_repeat_ngram_size", "max_new_tokens", "seed"):
        value = raw.get(name)
        if isinstance(value, float) and value.is_integer():
            raw[name] = int(value)  # sliders and number boxes send floats
    return SamplingParams.parse(raw)
