"""Memory tab: live device memory (NVML) with torch's allocator figures on a GPU, the process and system memory
without one."""

from __future__ import annotations

import gradio as gr

from playground.manager import ModelManager
from playground.memory import remote_gauges


def memory_report(manager: ModelManager) -> str:
    """The latest reading in words: per GPU, or the process and system memory without NVML."""
    sampler = manager.memory()
    reading = sampler.latest() or sampler.record()
    lines = [f"**Source:** {sampler.describe_source()}", ""]
    if reading.gpus:
        lines.append("| GPU | used / total MiB | utilisation | temperature | this process MiB | torch allocated / reserved MiB |")
        lines.append("|---|---|---|---|---|---|")
        for g in reading.gpus:
            torch_figures = (
                f"{g.torch_allocated_mib:.0f} / {g.torch_reserved_mib:.0f}" if g.torch_allocated_mib is not None else "n/a"
            )
            lines.append(
                f"| {g.index}: {g.name} | {g.used_mib:.0f} / {g.total_mib:.0f} | "
                f"{'n/a' if g.utilisation_pct is None else f'{g.utilisation_pct:.0f}%'} | "
                f"{'n/a' if g.temperature_c is None else f'{g.temperature_c:.0f} °C'} | "
                f"{'n/a' if g.process_used_mib is None else f'{g.process_used_mib:.0f}'} | {torch_figures} |"
            )
    lines.append("")
    # One fact per bullet: consecutive Markdown lines would run together into one paragraph.
    lines.append(
        f"- Process RSS **{reading.process_rss_mib:.0f} MiB** · system memory "
        f"**{reading.system_used_mib:.0f} / {reading.system_total_mib:.0f} MiB**"
    )
    inside = manager.gpu_calls.last_memory
    if inside is not None:
        where = "ZeroGPU call" if inside.zero_gpu else "generation"
        lines.append(
            f"- At the end of the last {where}: torch allocated **{inside.allocated_mib:.0f} MiB** "
            f"(peak {inside.peak_allocated_mib:.0f} MiB), reserved **{inside.reserved_mib:.0f} MiB**"
        )
    status = manager.status()
    if status.get("base_url"):  # a model served by a remote engine
        # The engine's figures were sampled with the rest: a view never fetches them itself.
        lines += ["", remote_report(status, reading.remote, status.get("remote_metrics_error"))]
    elif status.get("name"):
        lines.append(
            f"- Model **{status['name']}** ({status['kind']}, {status['dtype']} on {status['device']}): "
            f"{status['memory_mib']:.0f} MiB of weights"
        )
        if status.get("prompt_cache"):
            lines.append(prompt_cache_line(status["prompt_cache"]))
    return "\n".join(lines)


def prompt_cache_line(cache: dict) -> str:
    """The prompt cache in words: its size against its budget, and how much it has saved."""
    if not cache["budget_bytes"]:
        return "- Prompt cache **off** (--prompt-cache-mb 0): every request computes its whole prompt"
    mib = 2**20
    return (f"- Prompt cache **{cache['bytes'] / mib:.0f} / {cache['budget_bytes'] / mib:.0f} MiB** "
            f"({cache['tokens']} tokens) · {cache['hits']} of {cache['lookups']} requests resumed from it, "
            f"{cache['reused_tokens']} prompt tokens not computed again")


def remote_report(status: dict, metrics: dict[str, float] | None, unreachable: str | None = None) -> str:
    """The remote engine's own figures when it serves Prometheus metrics; the figures above are this process's."""
    head = (f"Model **{status['name']}** is remote ({status['base_url']}); "
            "the figures above are this playground's process only.")
    if unreachable:
        return head + f" ⚠️ The remote engine cannot be reached now ({unreachable})."
    if not metrics:
        return head + " The remote engine serves no metrics."
    parts = [f"{words} **{value:.1f}%**" if unit == "%" else f"{words} **{value:.0f}**"
             for words, value, unit in remote_gauges(metrics)]
    return head + (" Remote engine: " + " · ".join(parts) if parts else " The remote engine's metrics name no "
                   "KV cache or request figures.")


# The remote engine's plots: one per unit, shown only while a remote engine serves metrics.
REMOTE_PLOTS = [("%", "Remote KV cache used (%)"), ("requests", "Remote requests"), ("tokens/s", "Remote tokens/s")]


def memory_tick(manager: ModelManager):
    sampler = manager.memory()
    remote = sampler.remote_frame()
    shown = bool(manager.status().get("base_url")) and not remote.empty
    remote_updates = [
        gr.update(value=remote[remote["unit"] == unit][["seconds", "series", "value"]], visible=shown)
        for unit, _ in REMOTE_PLOTS
    ]
    return sampler.frame(), memory_report(manager), *remote_updates


MEMORY_TAB = "Memory"


def build_memory_tab(manager: ModelManager) -> tuple[gr.Timer, gr.Checkbox]:
    """The Memory tab; returns its refresh timer and pause box for `refresh_only_when_shown`."""
    def report_now() -> str:
        return memory_report(manager)

    def tick():
        return memory_tick(manager)

    # Named for what it shows: GPU figures appear in it when there is a GPU.
    with gr.Tab(MEMORY_TAB, id="memory"):
        report = gr.Markdown(report_now, elem_id="memory-report")
        plot = gr.LinePlot(
            x="seconds", y="MiB", color="series", title="Memory over the last minutes",
            x_title="seconds ago", y_title="MiB", height=320, elem_id="memory-plot",
        )
        with gr.Row():
            remote_plots = [
                gr.LinePlot(x="seconds", y="value", color="series", title=title, x_title="seconds ago",
                            y_title=unit, height=240, visible=False, elem_id=f"remote-plot-{index}",
                            y_lim=[0, 100] if unit == "%" else None)
                for index, (unit, title) in enumerate(REMOTE_PLOTS)
            ]
        with gr.Row():
            interval = gr.Slider(0.5, 10, value=1.0, step=0.5, label="Refresh every (s)")
            paused = gr.Checkbox(False, label="Pause")
        timer = gr.Timer(1.0, active=False)  # ticks only while the tab is shown (refresh_only_when_shown)

        def set_interval(seconds):
            manager.memory().set_interval(seconds)
            return gr.Timer(value=seconds)

        def set_paused(is_paused):
            manager.memory().paused = bool(is_paused)
            return gr.Timer(active=not is_paused)

        timer.tick(tick, None, [plot, report, *remote_plots], api_name="memory_tick", show_progress="hidden",
                   queue=False)
        interval.change(set_interval, interval, timer, api_name=False)
        paused.change(set_paused, paused, timer, api_name=False)
    return timer, paused


def refresh_only_when_shown(tabs: gr.Tabs, timer: gr.Timer, paused: gr.Checkbox) -> None:
    """Tick the memory panel while its tab is the one shown (and not paused): each tick redraws plots in the
    browser, which on a small machine competes with the model for the CPU."""

    def follow(is_paused, event: gr.SelectData):
        return gr.Timer(active=event.value == MEMORY_TAB and not is_paused)

    tabs.select(follow, paused, timer, api_name=False, show_progress="hidden", queue=False)
