"""Insight tab: a chat reply or lab cell token by token (probabilities, alternatives) and its expert routing."""

from __future__ import annotations

from typing import Any

import gradio as gr
import pandas as pd

from playground.insight import (
    alternatives_frame,
    expert_load_frame,
    readable,
    routing_heatmap_html,
    tokens_frame,
    tokens_html,
)
from playground.manager import ModelManager

SOURCES = ["Chat reply", "Lab cell"]
REMOTE_ROUTING = (
    "Expert routing is off: **{name}** runs on a remote engine ({url}), and the OpenAI API it speaks does not say "
    "which experts each token went to. Routing is recorded for a Yuan2-M32 model loaded in this playground."
)
NO_EXPERTS = (
    "Expert routing is off: **{name}** is a dense model with no mixture of experts, so every token goes through "
    "the same weights and there is no routing to show. It is recorded for Yuan2-M32 models, whose tokens each go "
    "to 2 of 32 experts in every layer."
)


def pick(chat_details: list, lab_details: list, source: str, number: Any) -> tuple[dict | None, str]:
    """The chosen reply / cell's details and a line naming it (or saying why there is nothing)."""
    items = chat_details if source == SOURCES[0] else lab_details
    what = "chat reply" if source == SOURCES[0] else "lab cell"
    available = [i for i, item in enumerate(items or [], start=1) if item]
    if not available:
        hint = "send a chat message" if source == SOURCES[0] else "run the lab"
        plural = "chat replies" if source == SOURCES[0] else "lab cells"
        reopened = len(items or [])
        if reopened:  # replies on screen, reopened from a saved chat: their tokens' probabilities were not kept
            return None, (f"The chat's {reopened} {'reply was' if reopened == 1 else 'replies were'} reopened from "
                          "saved history, which keeps their text but not their tokens' probabilities: press "
                          "**Regenerate** or send a message to inspect a reply.")
        return None, f"No {plural} to inspect yet: {hint} first (in this browser session)."
    try:
        index = int(number or 0)
    except (TypeError, ValueError):
        return None, f"⚠️ {number!r} is not a {what} number."
    index = available[-1] if index == 0 else index
    if index not in available:
        return None, f"⚠️ There is no {what} {index}; choose one of {', '.join(map(str, available))} (0: the latest)."
    return items[index - 1], f"{what.capitalize()} {index}"


def routing_view(details: dict | None, status: dict) -> tuple[str, pd.DataFrame | None, str]:
    """(heatmap HTML, expert load frame, note) for one reply, given the manager's status."""
    if status.get("base_url"):  # a remote engine reports no experts
        return "", None, REMOTE_ROUTING.format(name=status.get("name"), url=status.get("base_url"))
    if not status.get("has_experts"):
        return "", None, NO_EXPERTS.format(name=status.get("name") or "the loaded model")
    routing = (details or {}).get("routing")
    if not routing:
        return "", None, "No routing was recorded for this reply (it was generated before the current model loaded)."
    load = expert_load_frame(routing)
    note = (f"{len(routing['tokens'])} reply tokens × {len(routing['experts'])} layers; bars: how many of the "
            f"reply's tokens each of the {routing['num_experts']} experts served, stacked by layer. (The last "
            "generated token is not included: it was never fed back through the model.)")
    return routing_heatmap_html(routing), load, note


def inspect(status: dict, chat_details, lab_details, source, number):
    """(heading, tokens HTML, token table, first token's alternatives, routing heatmap, expert load, routing note,
    the inspected tokens, token tables' box, expert load's box): the boxes show only what has content."""
    details, heading = pick(chat_details, lab_details, source, number)
    tokens = (details or {}).get("tokens") or []
    heat, load, routing_note = routing_view(details, status)
    load_box = gr.update(visible=load is not None)
    if details is None:
        return heading, "", None, None, heat, load, routing_note, [], gr.update(visible=False), load_box
    first = readable(alternatives_frame(tokens[0])) if tokens else None
    line = f"**{heading}**: {len(tokens)} tokens. Click a row of the token table (or enter its index) for its alternatives."
    return (line, tokens_html(tokens), readable(tokens_frame(tokens)), first, heat, load, routing_note, tokens,
            gr.update(visible=bool(tokens)), load_box)


def token_alternatives(tokens: list, index: Any):
    """The alternatives table for token `index` (1-based) of the inspected reply."""
    try:
        position = int(index)
    except (TypeError, ValueError):
        return None, "⚠️ Enter a token index."
    if not tokens:
        return None, "Inspect a reply first."
    if not 1 <= position <= len(tokens):
        return None, f"⚠️ Token index must be between 1 and {len(tokens)}."
    token = tokens[position - 1]
    return readable(alternatives_frame(token)), f"Token {position}: id {token['id']}, text {token['text']!r}"


def build_insight_tab(manager: ModelManager, chat_details: gr.State, lab_details: gr.State):
    def inspect_reply(chat_details, lab_details, source, number):
        return inspect(manager.status(), chat_details, lab_details, source, number)

    with gr.Tab("Insight", id="insight"):
        gr.Markdown(
            "Look inside a reply: each token coloured by the probability it was sampled with, its top alternatives "
            "under the model's own distribution and under the sampling settings, and for Yuan2-M32 the experts "
            "each token went to. The next-token explorer is in the Sampling lab tab."
        )
        with gr.Row():
            source = gr.Radio(SOURCES, value=SOURCES[0], label="Inspect")
            number = gr.Number(value=0, precision=0, label="Reply / cell number", info="0: the latest")
            go = gr.Button("Inspect", variant="primary", elem_id="insight-inspect")
        heading = gr.Markdown("", elem_id="insight-heading")
        view = gr.HTML(elem_id="insight-tokens")
        inspected = gr.State([])
        # Hidden until a reply is inspected, and the expert load until there is routing: empty tables and plots
        # look broken. The alternatives get the wider side: they have seven columns.
        with gr.Row(equal_height=False, visible=False, elem_id="insight-token-tables") as token_tables:
            table = gr.Dataframe(label="Tokens", interactive=False, max_height=360, scale=2, min_width=320,
                                 elem_id="insight-token-table")
            with gr.Column(scale=3, min_width=480):
                index = gr.Number(value=1, precision=0, label="Token index")
                token_line = gr.Markdown("")
                alternatives = gr.Dataframe(label="Top alternatives: model vs after the sampling settings",
                                            interactive=False, elem_id="insight-alternatives")
        with gr.Accordion("Expert routing", open=True):
            routing_note = gr.Markdown("Inspect a reply to see which experts its tokens went to.",
                                       elem_id="insight-routing-note")
            heatmap = gr.HTML(elem_id="insight-routing")
            with gr.Column(visible=False, elem_id="insight-expert-load-box") as load_box:
                load = gr.BarPlot(x="expert", y="tokens", color="layer", title="Expert load across the reply",
                                  y_title="tokens routed", height=300, elem_id="insight-expert-load")

        def select_token(tokens, event: gr.SelectData):
            row = event.index[0] if isinstance(event.index, (list, tuple)) else event.index
            return (row + 1, *token_alternatives(tokens, row + 1))

        go.click(inspect_reply, [chat_details, lab_details, source, number],
                 [heading, view, table, alternatives, heatmap, load, routing_note, inspected, token_tables, load_box],
                 api_name="insight_inspect")  # API clients get the first seven: the state and the boxes are not sent
        index.submit(token_alternatives, [inspected, index], [alternatives, token_line], api_name="insight_token")
        table.select(select_token, inspected, [index, alternatives, token_line], api_name=False)
