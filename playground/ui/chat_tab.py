"""Chat tab: streaming multi-turn chat in the loaded model's own prompt format."""

from __future__ import annotations

from typing import Any

import gradio as gr

from playground.chat_format import message_text
from playground.errors import PlaygroundError
from playground.insight import INSPECT_TOP, routing_to_state, tokens_to_state
from playground.manager import get_manager
from playground.ui.controls import params_from_controls, preset_controls, sampling_controls

MAX_MESSAGE_CHARS = 100_000


def display(history: list[dict], stats: list[str]) -> list[dict]:
    """Chatbot messages: the clean history, each reply followed by its stats line."""
    shown, reply = [], 0
    for message in history:
        content = message["content"]
        if message["role"] == "assistant":
            line = stats[reply] if reply < len(stats) else ""
            reply += 1
            if line:
                content = f"{content}\n\n<sub>{line}</sub>"
        shown.append({"role": message["role"], "content": content})
    return shown


def _owner(request: gr.Request | None) -> str | None:
    return getattr(request, "session_hash", None)


def _messages(history: list[dict], system_prompt: str) -> list[dict]:
    messages = [{"role": "system", "content": system_prompt.strip()}] if system_prompt and system_prompt.strip() else []
    return messages + [{"role": m["role"], "content": message_text(m["content"])} for m in history]


def stream_reply(history, stats, details, system_prompt, params_values, request):
    """Generate the assistant turn after `history` (which ends with the user's turn); yields UI updates.

    `details` runs alongside `stats`: per reply, its tokens with their probabilities and (models with experts)
    the experts each token went to, for the Insight tab.
    """
    manager = get_manager()
    try:
        params = params_from_controls(params_values)
        loaded = manager.require_model()
        events = manager.stream(messages=_messages(history, system_prompt), params=params, owner=_owner(request),
                                logprobs=INSPECT_TOP, capture_routing=loaded.has_experts)
        reply, tokens = "", []
        for event in events:
            tokens.extend(event.tokens)
            if event.kind == "queued":
                # gr.skip(): the details state is only written when the reply is done, not copied per token.
                yield display(history, stats), history, stats, f"Waiting: place {event.position} in the queue", gr.skip()
            elif event.kind == "delta":
                reply += event.text
                yield (display(history + [{"role": "assistant", "content": reply}], stats), history, stats,
                       "Generating…", gr.skip())
            elif event.kind == "done":
                result = event.stats
                if result.finish_reason == "error":
                    yield display(history, stats), history, stats, f"⚠️ {result.error}", details
                    return
                history = history + [{"role": "assistant", "content": event.text}]
                stats = stats + [result.summary()]
                details = details + [{"tokens": tokens_to_state(tokens),
                                      "routing": routing_to_state(event.routing, loaded.tokenizer)}]
                yield display(history, stats), history, stats, f"Done: {result.summary()}", details
    except PlaygroundError as exc:
        gr.Warning(str(exc))
        yield display(history, stats), history, stats, f"⚠️ {exc}", details


def build_chat_tab():
    with gr.Tab("Chat", id="chat"):
        history = gr.State([])
        stats = gr.State([])
        details = gr.State([])  # per reply: tokens and routing for the Insight tab (not sent to API clients)
        system_prompt = gr.Textbox(label="System prompt", lines=2, placeholder="Optional instructions for the model")
        chatbot = gr.Chatbot(label="Conversation", height=460, elem_id="chatbot", buttons=["copy", "copy_all"])
        with gr.Row():
            message = gr.Textbox(
                show_label=False, placeholder="Type a message and press Enter", scale=8, elem_id="chat-input"
            )
            send = gr.Button("Send", variant="primary", scale=1, elem_id="chat-send")
            stop = gr.Button("Stop", variant="stop", scale=1, elem_id="chat-stop")
        with gr.Row():
            regenerate = gr.Button("Regenerate", size="sm")
            undo = gr.Button("Undo", size="sm")
            clear = gr.Button("Clear", size="sm")
        status = gr.Markdown("", elem_id="chat-status")
        controls = sampling_controls()
        preset_controls(controls, api_prefix="chat")

        def send_message(text, history, stats, details, system_prompt, temperature, top_p, top_k, min_p, typical_p, repetition_penalty, no_repeat_ngram_size, max_new_tokens, seed, stop,
                         request: gr.Request = None):
            params_values = [temperature, top_p, top_k, min_p, typical_p, repetition_penalty, no_repeat_ngram_size, max_new_tokens, seed, stop]
            text = message_text(text)
            if not text.strip():
                gr.Warning("Type a message first.")
                yield display(history, stats), history, stats, "⚠️ The message is empty.", details, text
                return
            if len(text) > MAX_MESSAGE_CHARS:
                gr.Warning("The message is too long.")
                yield (display(history, stats), history, stats,
                       f"⚠️ The message is {len(text)} characters; the limit is {MAX_MESSAGE_CHARS}.", details, text)
                return
            turn = history + [{"role": "user", "content": text}]
            final = None
            for update in stream_reply(turn, stats, details, system_prompt, params_values, request):
                final = update
                yield (*update, "")
            if final is not None and final[1] is turn:
                # The reply failed: keep the history as it was and give the message back to edit.
                yield display(history, stats), history, stats, final[3], details, text

        def regenerate_reply(history, stats, details, system_prompt, temperature, top_p, top_k, min_p, typical_p, repetition_penalty, no_repeat_ngram_size, max_new_tokens, seed, stop,
                             request: gr.Request = None):
            params_values = [temperature, top_p, top_k, min_p, typical_p, repetition_penalty, no_repeat_ngram_size, max_new_tokens, seed, stop]
            if not history or history[-1]["role"] != "assistant":
                yield display(history, stats), history, stats, "Nothing to regenerate yet.", details
                return
            yield from stream_reply(history[:-1], stats[:-1], details[: len(stats) - 1], system_prompt,
                                    params_values, request)

        def undo_turn(history, stats, details):
            if history and history[-1]["role"] == "assistant":
                history, stats, details = history[:-1], stats[:-1], details[: len(stats) - 1]
            if history and history[-1]["role"] == "user":
                history = history[:-1]
            return display(history, stats), history, stats, "Removed the last turn.", details

        def clear_chat(request: gr.Request = None):
            get_manager().cancel(_owner(request)) if _owner(request) else None
            return [], [], [], "Cleared.", []

        def stop_generation(request: gr.Request = None):
            owner = _owner(request)
            count = get_manager().cancel(owner) if owner else 0
            return "Stopping…" if count else "Nothing is running."

        # State outputs are not part of the API, so the endpoints' visible outputs stay as they were.
        outputs = [chatbot, history, stats, status, details]
        inputs = [history, stats, details, system_prompt, *controls]
        # concurrency_limit=None: the manager's own queue orders generations and reports places in it.
        message.submit(send_message, [message, *inputs], [*outputs, message], api_name="chat", concurrency_limit=None)
        send.click(send_message, [message, *inputs], [*outputs, message], api_name=False, concurrency_limit=None)
        regenerate.click(regenerate_reply, inputs, outputs, api_name="chat_regenerate", concurrency_limit=None)
        undo.click(undo_turn, [history, stats, details], outputs, api_name="chat_undo")
        clear.click(clear_chat, None, outputs, api_name="chat_clear")
        stop.click(stop_generation, None, status, api_name="chat_stop", queue=False)
    return details
