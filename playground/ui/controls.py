"""Sampling controls shared by the tabs, and turning their values into validated SamplingParams."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import gradio as gr

from playground.errors import ParameterError
from playground.params import SAMPLING_FIELDS, SamplingParams
from playground.presets import load_presets, save_user_preset

if TYPE_CHECKING:
    from playground.manager import ModelManager

Controls = dict[str, gr.components.Component]  # one control per sampling field, in the registry's order


def session_owner(request: gr.Request | None) -> str | None:
    """Who a page's generations belong to in the manager's queue (Stop, queue places, one reply at a time): its
    Gradio session; None for a call without one."""
    return getattr(request, "session_hash", None)


def refusal(exc: Exception) -> str:
    """A refused action as people see it: a toast now, and the status line returned (kept on the page)."""
    gr.Warning(str(exc))
    return f"⚠️ {exc}"


def refresh_choices_on_focus(dropdown: gr.Dropdown, choices, api_name: str | bool = False) -> None:
    """Re-list `choices()` each time the dropdown is opened (files may have appeared since), keeping its value."""
    dropdown.focus(lambda current: gr.update(choices=choices(), value=current), dropdown, dropdown,
                   api_name=api_name, show_progress="hidden", queue=False)


def sampling_controls(defaults: SamplingParams | None = None, per_row: int = 2) -> Controls:
    """One control per SamplingParams field, named and ordered as the registry lists them, `per_row` to a row.

    Numbers are number boxes with no bounds of their own: a value out of range reaches SamplingParams, which refuses
    it with the same message as the lab and the APIs (a slider would clamp it silently, and Gradio would refuse an
    API client's value with its own words first); the refused field is outlined (chat_tab.MARK_REFUSED_JS). A field
    whose default is "none" (the seed) is a text box: empty means none and looks empty (a number box shows 0).
    """
    values = control_values(defaults or SamplingParams())
    numeric = [field for field in SAMPLING_FIELDS.values() if field.numeric]
    controls: Controls = {}
    for start in range(0, len(numeric), per_row):
        with gr.Row(equal_height=True):
            for field in numeric[start:start + per_row]:
                common = dict(label=field.label, info=field.limits.reads, min_width=140,
                              elem_id=f"sampling-{field.name}")
                controls[field.name] = (
                    gr.Textbox(value=values[field.name], placeholder="empty: random", **common)
                    if field.default is None else gr.Number(value=values[field.name], step=field.limits.step, **common)
                )
    for field in SAMPLING_FIELDS.values():
        if not field.numeric:
            controls[field.name] = gr.Textbox(value=values[field.name], lines=2, label=field.label,
                                              info="one per line; \\n means a newline",
                                              elem_id=f"sampling-{field.name}")
    return controls


class UnavailableControls:
    """Greys out the fields the current engine cannot take (a remote engine may lack some) and brings them back when
    the model changes. Refreshed with the rest of the page (app.keep_page_current), which keeps the greyed set this
    page shows, so a refresh changes nothing until it differs."""

    def __init__(self, manager: ModelManager, controls: Controls):
        self.manager = manager
        self.controls = list(controls.values())
        self.names = list(controls)
        self.infos = {name: getattr(control, "info", None) for name, control in controls.items()}

    def refresh(self, greyed: list[str] | None, status: dict) -> tuple[list, list[str] | None]:
        """(an update per control, the greyed set now) given the set the page shows (None before the first) and the
        manager's status."""
        missing = sorted(self.manager.unavailable_params()) if status["state"] == "ready" else greyed
        if missing is None or missing == greyed:
            return [gr.skip() for _ in self.controls], greyed
        return [
            gr.update(interactive=False, info="not available on the remote engine") if name in missing
            else gr.update(interactive=True, info=self.infos[name] or "")  # "" clears it: None would leave the old text
            for name in self.names
        ], missing


def params_from_controls(values: dict[str, Any]) -> SamplingParams:
    """Control values by field name -> SamplingParams; raises ParameterError naming the field and its range."""
    values = dict(values)
    for name, field in SAMPLING_FIELDS.items():
        if not field.numeric and isinstance(values.get(name), str):  # stop strings: one per line, \n a newline
            values[name] = [line.replace("\\n", "\n") for line in values[name].splitlines() if line]
    return SamplingParams.from_form(values)


def control_values(params: SamplingParams) -> dict[str, Any]:
    """SamplingParams -> control values by field name (stop strings one per line, newlines as \\n; an unset
    seed as an empty box)."""
    values = params.model_dump()
    for name, field in SAMPLING_FIELDS.items():
        if not field.numeric:
            values[name] = "\n".join(text.replace("\n", "\\n") for text in values[name])
        elif field.default is None:
            values[name] = "" if values[name] is None else str(values[name])
    return values


# ------------------------------------------------------------------------------------------------ presets


def preset_names() -> list[str]:
    presets, _ = load_presets()
    return list(presets)


def preset_problems_note(problems: list[str]) -> str:
    return ("\n\n⚠️ Skipped preset files: " + "; ".join(problems)) if problems else ""


class PresetPicker:
    """A preset dropdown (with its note) above the sampling controls, and a row that saves them as a user preset.

    Made in two steps so the dropdown sits above the controls it fills: `PresetPicker()` where the dropdown goes,
    then `save_row(controls)` where the save row goes, which wires both."""

    def __init__(self):
        self.chooser = gr.Dropdown(preset_names(), value=None, label="Preset (fills the settings below)",
                                   elem_id="preset-choice")
        self.note = gr.Markdown("", elem_id="preset-note")

    def save_row(self, controls: Controls, api_prefix: str) -> None:
        with gr.Row():
            name = gr.Textbox(label="Save these settings as", placeholder="my preset", scale=3, min_width=120)
            save = gr.Button("Save preset", size="sm", scale=1, min_width=80)
        chooser, note = self.chooser, self.note

        def fill(chosen):
            presets, problems = load_presets()
            if chosen not in presets:
                return [gr.skip()] * len(controls) + [f"⚠️ No preset named {chosen!r}.{preset_problems_note(problems)}"]
            preset = presets[chosen]
            values = control_values(preset.params)
            where = "your preset" if preset.user else "shipped preset"
            text = f"Applied {where} **{preset.name}**: {preset.description}".rstrip(": ")
            return [*(values[field] for field in controls), text + preset_problems_note(problems)]

        def save_preset(preset_name, **values):
            try:
                path = save_user_preset(preset_name, params_from_controls(values))
            except ParameterError as exc:
                return gr.skip(), f"⚠️ {exc}"
            return (gr.update(choices=preset_names(), value=preset_name.strip()),
                    f"Saved preset **{preset_name.strip()}** to `{path}`.")

        chooser.input(fill, chooser, [*controls.values(), note], api_name=f"{api_prefix}_preset")
        refresh_choices_on_focus(chooser, preset_names)
        save.click(save_preset, [name], [chooser, note], inputs_kwargs=controls, api_name=f"{api_prefix}_preset_save")
        for control in controls.values():  # a value changed by hand: the settings are no longer the preset's
            control.input(lambda: (None, ""), None, [chooser, note], api_name=False, show_progress="hidden",
                          queue=False)
