"""Sampling controls shared by the tabs, and turning their values into validated SamplingParams."""

from __future__ import annotations

from typing import Any

import gradio as gr

from playground.errors import ParameterError
from playground.params import RANGES, SamplingParams
from playground.presets import load_presets, save_user_preset

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
    controls = [temperature, top_p, top_k, min_p, typical_p, repetition_penalty, no_repeat, max_new_tokens, seed, stop]
    mark_unavailable_controls(controls)
    return controls


def mark_unavailable_controls(controls: list[gr.components.Component]) -> None:
    """Grey out the fields the current engine cannot take (a remote engine may lack some), and bring them back
    when the model changes. The page's greyed set is kept per session, so a tick changes nothing until it differs."""
    from playground.manager import get_manager

    check = gr.Timer(2.0)
    shown = gr.State(None)  # the fields this page shows greyed out; None before the first check
    infos = [getattr(control, "info", None) for control in controls]

    def mark(greyed):
        manager = get_manager()
        missing = sorted(manager.unavailable_params()) if manager.status()["state"] == "ready" else greyed
        if missing is None or missing == greyed:
            return [gr.skip() for _ in controls] + [greyed]
        updates = [
            gr.update(interactive=False, info="not available on the remote engine") if name in missing
            else gr.update(interactive=True, info=info or "")  # "" clears it: None would leave the old text
            for name, info in zip(PARAM_FIELDS, infos)
        ]
        return updates + [missing]

    check.tick(mark, shown, [*controls, shown], api_name=False, queue=False, show_progress="hidden")


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


# ------------------------------------------------------------------------------------------------ presets


def preset_names() -> list[str]:
    presets, _ = load_presets()
    return list(presets)


def preset_problems_note(problems: list[str]) -> str:
    return ("\n\n⚠️ Skipped preset files: " + "; ".join(problems)) if problems else ""


def control_values(params: SamplingParams) -> list[Any]:
    """SamplingParams -> control values in PARAM_FIELDS order (stop strings one per line, newlines as \\n)."""
    values = [getattr(params, name) for name in PARAM_FIELDS[:-1]]
    return [*values, "\n".join(s.replace("\n", "\\n") for s in params.stop)]


def out_of_range(controls: list[gr.components.Component], values: list[Any]) -> list[str]:
    """Fields whose value a slider cannot show (a hand-edited preset may be valid but beyond a slider's range)."""
    bad = []
    for name, control, value in zip(PARAM_FIELDS, controls, values):
        low, high = getattr(control, "minimum", None), getattr(control, "maximum", None)
        if isinstance(value, (int, float)) and low is not None and not low <= value <= high:
            bad.append(f"{name} {value} (this control takes {low}–{high})")
    return bad


def preset_controls(controls: list[gr.components.Component], api_prefix: str) -> gr.Dropdown:
    """A preset dropdown that fills `controls`, and a box + button that save them as a user preset."""
    with gr.Row():
        chooser = gr.Dropdown(preset_names(), value=None, label="Preset", scale=2,
                              info="fills the sampling controls below")
        name = gr.Textbox(label="Save these settings as", placeholder="my preset", scale=2)
        save = gr.Button("Save preset", size="sm", scale=1)
    note = gr.Markdown("")

    def fill(chosen):
        presets, problems = load_presets()
        if chosen not in presets:
            return [gr.update()] * len(controls) + [f"⚠️ No preset named {chosen!r}.{preset_problems_note(problems)}"]
        preset = presets[chosen]
        values = control_values(preset.params)
        bad = out_of_range(controls, values)
        if bad:
            return [gr.update()] * len(controls) + [f"⚠️ Preset {chosen!r} was not applied: {', '.join(bad)}."]
        where = "your preset" if preset.user else "shipped preset"
        text = f"Applied {where} **{preset.name}**: {preset.description}".rstrip(": ")
        return [*values, text + preset_problems_note(problems)]

    def save_preset(preset_name, *values):
        try:
            path = save_user_preset(preset_name, params_from_controls(values))
        except ParameterError as exc:
            return gr.update(), f"⚠️ {exc}"
        return gr.update(choices=preset_names(), value=preset_name.strip()), f"Saved preset **{preset_name.strip()}** to `{path}`."

    def refresh(current):
        return gr.update(choices=preset_names(), value=current)

    chooser.input(fill, chooser, [*controls, note], api_name=f"{api_prefix}_preset")
    chooser.focus(refresh, chooser, chooser, api_name=False, show_progress="hidden", queue=False)
    save.click(save_preset, [name, *controls], [chooser, note], api_name=f"{api_prefix}_preset_save")
    return chooser
