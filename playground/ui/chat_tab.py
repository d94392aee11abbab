"""Chat tab: streaming multi-turn chat in the loaded model's own prompt format."""

from __future__ import annotations

from typing import Any

import gradio as gr

from playground.chat_format import message_text
from playground.errors import PlaygroundError
from playground.manager import get_manager
from playground.ui.controls import params_from_controls, sampling_controls

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


def stream_reply(history, stats, system_prompt, params_values, request):
    """Generate the assistant turn after `history` (which ends with the user's turn); yields UI updates."""
    manager = get_manager()
    try:
        params = params_from_controls(params_values)
        events = manager.stream(messages=_messages(history, system_prompt), params=params, owner=_owner(request))
        reply = ""
        for event in events:
            if event.kind == "queued":
                yield display(history, stats), history, stats, f"Waiting: place {event.position} in the queue"
            elif event.kind == "delta":
                reply += event.text
                yield display(history + [{"role": "assistant", "content": reply}], stats), history, stats, "Generating…"
            elif event.kind == "done":
                result = event.stats
                if result.finish_reason == "error":
                    yield display(history, stats), history, stats, f"⚠️ {result.error}"
                    return
                history = history + [{"role": "assistant", "content": event.text}]
                stats = stats + [result.summary()]
                yield display(history, stats), history, stats, f"Done: {result.summary()}"
    except PlaygroundError as exc:
        gr.Warning(str(exc))
        yield display(history, stats), history, stats, f"⚠️ {exc}"


def build_chat_tab():
    with gr.Tab("Chat", id="chat"):
        history = gr.State([])
        stats = gr.State([])
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

        def send_message(text, history, stats, system_prompt, temperature, top_p, top_k, min_p, typical_p, repetition_penalty, no_repeat_ngram_size, max_new_tokens, seed, stop,
                         request: gr.Request = None):
            params_values = [temperature, top_p, top_k, min_p, typical_p, repetition_penalty, no_repeat_ngram_size, max_new_tokens, seed, stop]
            text = message_text(text)
            if not text.strip():
                gr.Warning("Type a message first.")
                yield display(history, stats), history, stats, "⚠️ The message is empty.", text
                return
            if len(text) > MAX_MESSAGE_CHARS:
                gr.Warning("The message is too long.")
                yield (display(history, stats), history, stats,
                       f"⚠️ The message is {len(text)} characters; the limit is {MAX_MESSAGE_CHARS}.", text)
                return
            turn = history + [{"role": "user", "content": text}]
            final = None
            for update in stream_reply(turn, stats, system_prompt, params_values, request):
                final = update
                yield (*update, "")
            if final is not None and final[1] is turn:
                # The reply failed: keep the history as it was and give the message back to edit.
                yield display(history, stats), history, stats, final[3], text

        def regenerate_reply(history, stats, system_prompt, temperature, top_p, top_k, min_p, typical_p, repetition_penalty, no_repeat_ngram_size, max_new_tokens, seed, stop,
                             request: gr.Request = None):
            params_values = [temperature, top_p, top_k, min_p, typical_p, repetition_penalty, no_repeat_ngram_size, max_new_tokens, seed, stop]
            if not history or history[-1]["role"] != "assistant":
                yield display(history, stats), history, stats, "Nothing to regenerate yet."
                return
            yield from stream_reply(history[:-1], stats[:-1], system_prompt, params_values, request)

        def undo_turn(history, stats):
            if history and history[-1]["role"] == "assistant":
                history, stats = history[:-1], stats[:-1]
            if history and history[-1]["role"] == "user":
                history = history[:-1]
            return display(history, stats), history, stats, "Removed the last turn."

        def clear_chat(request: gr.Request = None):
            get_manager().cancel(_owner(request)) if _owner(request) else None
            return [], [], [], "Cleared."

        def stop_generation(request: gr.Request = None):
            owner = _owner(request)
            count = get_manager().cancel(owner) if owner else 0
            return "Stopping…" if count else "Nothing is running."

        outputs = [chatbot, history, stats, status]
        inputs = [history, stats, system_prompt, *controls]
        # concurrency_limit=None: the manager's own queue orders generations and reports places in it.
        message.submit(send_message, [message, *inputs], [*outputs, message], api_name="chat", concurrency_limit=None)
        send.click(send_message, [message, *inputs], [*outputs, message], api_name=False, concurrency_limit=None)
        regenerate.click(regenerate_reply, inputs, outputs, api_name="chat_regenerate", concurrency_limit=None)
        undo.click(undo_turn, [history, stats], outputs, api_name="chat_undo")
        clear.click(clear_chat, None, outputs, api_name="chat_clear")
        stop.click(stop_generation, None, status, api_name="chat_stop", queue=False)
    return chatbot
