"""Sampling controls shared by the tabs, and turning their values into validated SamplingParams."""

from __future__ import annotations

from typing import Any

import gradio as gr

from playground.errors import ParameterError
from playground.params import SAMPLING_FIELDS, SamplingParams
from playground.presets import load_presets, save_user_preset

CONTROLS_PER_ROW = 3
Controls = dict[str, gr.components.Component]  # one control per sampling field, in the registry's order


def sampling_controls(defaults: SamplingParams | None = None, open: bool = False) -> Controls:
    """One control per SamplingParams field in an accordion, named and ordered as the registry lists them.

    Numbers are plain number boxes with no bounds of their own: a value out of range reaches SamplingParams,
    which refuses it with the same message as the lab and the APIs (a slider would clamp it silently).
    """
    values = control_values(defaults or SamplingParams())
    numeric = [field for field in SAMPLING_FIELDS.values() if field.numeric]
    controls: Controls = {}
    with gr.Accordion("Sampling", open=open):
        for start in range(0, len(numeric), CONTROLS_PER_ROW):
            with gr.Row():
                for field in numeric[start:start + CONTROLS_PER_ROW]:
                    controls[field.name] = gr.Number(
                        value=values[field.name], label=field.name, info=field.limits.reads, step=field.limits.step,
                        placeholder="random" if field.default is None else None, min_width=160,
                        elem_id=f"sampling-{field.name}",
                    )
        for field in SAMPLING_FIELDS.values():
            if not field.numeric:
                controls[field.name] = gr.Textbox(value=values[field.name], lines=2, label=f"{field.name} strings",
                                                  info="one per line; \\n means a newline",
                                                  elem_id=f"sampling-{field.name}")
    mark_unavailable_controls(controls)
    return controls


def mark_unavailable_controls(controls: Controls) -> None:
    """Grey out the fields the current engine cannot take (a remote engine may lack some), and bring them back
    when the model changes. The page's greyed set is kept per session, so a tick changes nothing until it differs."""
    from playground.manager import get_manager

    check = gr.Timer(2.0)
    shown = gr.State(None)  # the fields this page shows greyed out; None before the first check
    infos = {name: getattr(control, "info", None) for name, control in controls.items()}

    def mark(greyed):
        manager = get_manager()
        missing = sorted(manager.unavailable_params()) if manager.status()["state"] == "ready" else greyed
        if missing is None or missing == greyed:
            return [gr.skip() for _ in controls] + [greyed]
        updates = [
            gr.update(interactive=False, info="not available on the remote engine") if name in missing
            else gr.update(interactive=True, info=infos[name] or "")  # "" clears it: None would leave the old text
            for name in controls
        ]
        return updates + [missing]

    check.tick(mark, shown, [*controls.values(), shown], api_name=False, queue=False, show_progress="hidden")


def params_from_controls(values: dict[str, Any]) -> SamplingParams:
    """Control values by field name -> SamplingParams; raises ParameterError naming the field and its range."""
    values = dict(values)
    for name, field in SAMPLING_FIELDS.items():
        if not field.numeric and isinstance(values.get(name), str):  # stop strings: one per line, \n a newline
            values[name] = [line.replace("\\n", "\n") for line in values[name].splitlines() if line]
    return SamplingParams.from_form(values)


def control_values(params: SamplingParams) -> dict[str, Any]:
    """SamplingParams -> control values by field name (stop strings one per line, newlines as \\n)."""
    values = params.model_dump()
    for name, field in SAMPLING_FIELDS.items():
        if not field.numeric:
            values[name] = "\n".join(text.replace("\n", "\\n") for text in values[name])
    return values


# ------------------------------------------------------------------------------------------------ presets


def preset_names() -> list[str]:
    presets, _ = load_presets()
    return list(presets)


def preset_problems_note(problems: list[str]) -> str:
    return ("\n\n⚠️ Skipped preset files: " + "; ".join(problems)) if problems else ""


def preset_controls(controls: Controls, api_prefix: str) -> gr.Dropdown:
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
        where = "your preset" if preset.user else "shipped preset"
        text = f"Applied {where} **{preset.name}**: {preset.description}".rstrip(": ")
        return [*(values[name] for name in controls), text + preset_problems_note(problems)]

    def save_preset(preset_name, **values):
        try:
            path = save_user_preset(preset_name, params_from_controls(values))
        except ParameterError as exc:
            return gr.update(), f"⚠️ {exc}"
        return gr.update(choices=preset_names(), value=preset_name.strip()), f"Saved preset **{preset_name.strip()}** to `{path}`."

    def refresh(current):
        return gr.update(choices=preset_names(), value=current)

    chooser.input(fill, chooser, [*controls.values(), note], api_name=f"{api_prefix}_preset")
    chooser.focus(refresh, chooser, chooser, api_name=False, show_progress="hidden", queue=False)
    save.click(save_preset, [name], [chooser, note], inputs_kwargs=controls, api_name=f"{api_prefix}_preset_save")
    return chooser
