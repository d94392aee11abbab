"""Chat tab: streaming multi-turn chat in the loaded model's own prompt format."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import gradio as gr

from playground.chat_format import message_text
from playground.errors import PlaygroundError, not_unicode
from playground.insight import INSPECT_TOP
from playground.generation.events import GenerationStats
from playground.manager import ModelManager
from playground.storage import Storage
from playground.storage_exchange import StorageError
from playground.structured import schema_from_text
from playground.params import SamplingParams
from playground.ui.controls import (
    PresetPicker,
    UnavailableControls,
    control_values,
    params_from_controls,
    refusal,
    sampling_controls,
    session_owner,
)
from playground.ui.replies import ClearableReplies, StreamedReply, UpdatePacer

SCHEMA_INPUT = "response_schema"  # the chat's structured-output box, passed with the sampling controls
SCHEMA_ON = "**Structured output is on**: each reply must match the JSON Schema under *Structured output*."
# A structured reply is pretty-printed JSON: its indentation shows as written (the chat renders Markdown). A reply's
# stats line (a titled message of its own, see `stats_message`) reads as the reply's footer: no bubble, no fold arrow,
# no copy button of its own. A setting that was refused is outlined until the next send.
CHAT_CSS = """
#chatbot .message-content p { white-space: pre-wrap; }
#chatbot .message-row:has(.thought-group) .message { border: none !important; background: none !important;
  box-shadow: none !important; padding: 0 !important; margin-top: -6px; }
#chatbot .message-row:has(.thought-group) .thought-group { border: none !important; background: none !important;
  padding: 0 !important; margin: 0 !important; }
#chatbot .message-row:has(.thought-group) .arrow { display: none !important; }
#chatbot .message-row:has(.thought-group) .title { cursor: default; pointer-events: none; padding: 0 !important;
  color: var(--body-text-color-subdued); font-size: var(--text-sm); }
#chatbot .message-row:has(.thought-group) + .message-buttons { display: none !important; }
#chat-settings .refused input, #chat-settings .refused textarea {
  border-color: #e11d48 !important; box-shadow: 0 0 0 2px #e11d48 !important;
}
"""
# In the browser, after a send: the field a refusal names ("⚠️ temperature: must be ...") is outlined, the others not.
MARK_REFUSED_JS = """() => {
  const status = document.querySelector('#chat-status')?.innerText || '';
  const named = status.match(/⚠️\\s*([a-z_]+):/);
  document.querySelectorAll('#chat-settings [id^="sampling-"]').forEach(el => el.classList.remove('refused'));
  if (named) document.querySelector('#sampling-' + named[1])?.classList.add('refused');
}"""


def stats_message(line: str) -> dict:
    """A reply's stats line as a message of its own after it, titled (Gradio's "thought" form, shown as the reply's
    footer by CHAT_CSS): the reply's copy button, "Copy conversation" and API clients get the reply's text alone."""
    return {"role": "assistant", "content": "", "metadata": {"title": line, "status": "done"}}


def display(history: list[dict], stats: list[str]) -> list[dict]:
    """Chatbot messages: the clean history, each reply followed by its stats line (`stats_message`)."""
    shown, reply = [], 0
    for message in history:
        shown.append({"role": message["role"], "content": message["content"]})
        if message["role"] == "assistant":
            line = stats[reply] if reply < len(stats) else ""
            reply += 1
            if line:
                shown.append(stats_message(line))
    return shown


def history_index(history: list[dict], stats: list[str], shown_index: int) -> int | None:
    """The history position of the Chatbot's message `shown_index` (None for a stats line or no message)."""
    shown = display(history, stats)
    if not 0 <= shown_index < len(shown) or shown[shown_index].get("metadata"):
        return None
    return sum(not message.get("metadata") for message in shown[:shown_index])


@dataclass
class ChatTab:
    """The chat tab's parts that other tabs use: Insight reads `details`, History opens saved chats into it."""

    chatbot: gr.Chatbot
    history: gr.State
    stats: gr.State
    details: gr.State
    chat_id: gr.State  # the saved chat this conversation continues; None until its first message is saved
    system_prompt: gr.Textbox
    status: gr.Markdown
    shown_chat: gr.BrowserState  # the saved chat this browser shows, so a page reload brings it back
    settings: dict[str, Any]  # the sampling controls and the schema box, by name
    remembered: gr.BrowserState  # their values in this browser, so a reload or a restart keeps them
    unavailable: UnavailableControls  # greys out the sampling controls the engine cannot take (refreshed by the app)

    def settings_values(self, values: dict[str, Any] | None) -> list:
        """Updates for the settings controls from `values` by name (a name it lacks keeps its control as it is)."""
        return [values[name] if values and name in values else gr.skip() for name in self.settings]

    def restore_settings_after(self, event, storage: Storage | None) -> None:
        """After `event` has opened a saved chat: the settings its latest reply was written with, in the controls."""

        def settings_of(chat_id):
            try:
                chat = storage.load_chat(chat_id) if storage is not None and chat_id else None
            except StorageError:
                chat = None
            return self.settings_values(saved_settings(chat) if chat is not None else None)

        event.then(settings_of, self.chat_id, list(self.settings.values()), api_name=False, show_progress="hidden")

    def restore_on_load(self, demo: gr.Blocks, storage: Storage | None) -> None:
        """On page load, the settings this browser had, and the saved chat it showed (nothing when saving is off or
        it is gone)."""
        demo.load(self.settings_values, self.remembered, list(self.settings.values()), api_name=False,
                  show_progress="hidden", queue=False)

        def restore(chat_id):
            chat = None
            if storage is not None and chat_id:
                try:
                    chat = storage.load_chat(chat_id)
                except StorageError:
                    chat = None
            if chat is None:
                return (gr.skip(),) * 7
            return (*saved_chat_states(chat), reopened_note(chat))

        demo.load(restore, self.shown_chat, [self.chatbot, self.system_prompt, self.history, self.stats,
                                             self.details, self.chat_id, self.status], api_name=False)


def reopened_note(chat) -> str:
    """The Chat tab's status line for a chat just reopened (from History, or by a page reload): where the user is
    looking, with what to do when its last message never got a reply."""
    note = f"Reopened your chat “{chat.title or '(untitled)'}”"
    if chat.messages and chat.messages[-1].role == "user":
        return note + ": its last message has no reply (the server stopped during it); press **Regenerate** to answer it."
    return note + "; new turns continue it."


def saved_chat_states(chat) -> tuple:
    """A saved chat as the Chat tab's (chatbot, system prompt, history, stats, details, chat id)."""
    history = [{"role": m.role, "content": m.content} for m in chat.messages]
    stats = [(m.stats or {}).get("summary", "") for m in chat.messages if m.role == "assistant"]
    details = [None] * len(stats)  # token details are not saved; Insight skips these replies
    return display(history, stats), chat.system_prompt, history, stats, details, chat.id


# ----------------------------------------------------------------------------- saving turns as they happen


def loaded_model_name(manager: ModelManager) -> str | None:
    loaded = manager.loaded
    return loaded.name if loaded else None


def reply_stats(result: GenerationStats, model: str | None, params: SamplingParams | None = None,
                schema: str = "") -> dict[str, Any]:
    """What is saved with a reply: its stats, the line shown under it, the model that wrote it and every setting it
    was written with (the sampling fields and the structured-output schema), so it can be reproduced."""
    settings = {} if params is None else {"settings": {**params.model_dump(), SCHEMA_INPUT: schema}}
    return {**result.as_dict(), "summary": result.summary(), "model": model, **settings}


def saved_settings(chat) -> dict[str, Any] | None:
    """The control values of a saved chat's latest reply that kept its settings (None: none did)."""
    for message in reversed(chat.messages):
        settings = (message.stats or {}).get("settings")
        if message.role == "assistant" and isinstance(settings, dict):
            try:
                values = control_values(SamplingParams.parse({k: v for k, v in settings.items() if k != SCHEMA_INPUT}))
            except PlaygroundError:  # written by another version, or edited by hand: the controls stay as they are
                return None
            return {**values, SCHEMA_INPUT: str(settings.get(SCHEMA_INPUT) or "")}
    return None


def save_turn(storage: Storage | None, chat_id: str | None, earlier: list[dict], role: str, content: str,
              stats: dict | None = None, system_prompt: str | None = None, model: str | None = None) -> str | None:
    """Save one turn after the `earlier` ones; returns the chat's id (a chat is created by its first save, with
    `model`, the model serving it).

    Saving never breaks the chat: a storage problem is shown as a warning and the conversation goes on.
    """
    if storage is None:
        return chat_id
    try:
        if chat_id is None:
            chat_id = storage.create_chat(model=model, system_prompt=system_prompt or "")
            for position, message in enumerate(earlier):  # turns from before saving worked, if any
                storage.put_message(chat_id, position, message["role"], message_text(message["content"]))
        storage.put_message(chat_id, len(earlier), role, content, stats=stats,
                            model=(stats or {}).get("model"), system_prompt=system_prompt)
    except StorageError as exc:
        gr.Warning(f"This turn was not saved: {exc}")
    return chat_id


def forget_turns(storage: Storage | None, chat_id: str | None, keep: int) -> str | None:
    """Drop the saved turns after the first `keep` (undo, a reply that failed); returns the chat id to go on with.

    A chat left with no turns is deleted (the History tab would only list it as empty); the next message then
    starts a new one.
    """
    if storage is None or chat_id is None:
        return chat_id
    try:
        if keep == 0:
            storage.delete_chat(chat_id)
            return None
        storage.truncate_chat(chat_id, keep)
    except StorageError as exc:
        gr.Warning(f"The saved chat could not be updated: {exc}")
    return chat_id


def _messages(history: list[dict], system_prompt: str) -> list[dict]:
    messages = [{"role": "system", "content": system_prompt.strip()}] if system_prompt and system_prompt.strip() else []
    return messages + [{"role": m["role"], "content": message_text(m["content"])} for m in history]


def stream_reply(manager, storage, history, stats, details, system_prompt, sampling, request, chat_id=None):
    """Generate the assistant turn after `history` (which ends with the user's turn); yields UI updates.

    `details` runs alongside `stats`: per reply, its tokens with their probabilities and (models with experts)
    the experts each token went to, for the Insight tab. A finished reply is saved to chat `chat_id` (when
    saving is on) before it is shown as done; a reply still streaming is never saved.
    """
    sampling = dict(sampling)
    try:
        schema = sampling.pop(SCHEMA_INPUT, "") or ""
        response_format = schema_from_text(schema)
        params = params_from_controls(sampling)
        loaded = manager.require_model()
        events = manager.stream(messages=_messages(history, system_prompt), params=params, owner=session_owner(request),
                                logprobs=INSPECT_TOP, capture_routing=loaded.has_experts,
                                response_format=response_format)
        reply = StreamedReply(response_format, loaded.tokenizer)
        pacer = UpdatePacer()
        for event in events:
            reply.take(event)
            if not pacer.due(event):
                continue  # its text shows with the next update
            if reply.stats is None:
                # A bubble from the start: the queue place until the first words arrive. gr.skip(): the details
                # state is only written when the reply is done, not copied per token.
                streaming = {"role": "assistant", "content": reply.text or f"*{reply.line}*"}
                yield display(history + [streaming], stats), history, stats, reply.line, gr.skip()
            elif reply.failed:
                yield display(history, stats), history, stats, reply.line, details
                return
            else:
                save_turn(storage, chat_id, history, "assistant", event.text,
                          stats=reply_stats(reply.stats, loaded_model_name(manager), params, schema))
                history = history + [{"role": "assistant", "content": reply.text}]
                stats = stats + [reply.summary]
                details = details + [reply.details]
                yield display(history, stats), history, stats, f"Done: {reply.summary}", details
    except PlaygroundError as exc:
        yield display(history, stats), history, stats, refusal(exc), details


def build_chat_tab(manager: ModelManager, storage: Storage | None = None) -> ChatTab:
    """The Chat tab, replying through `manager`; turns are saved to `storage` (None: not saved)."""
    with gr.Tab("Chat", id="chat"):
        history = gr.State([])
        stats = gr.State([])
        details = gr.State([])  # per reply: tokens and routing for the Insight tab (not sent to API clients)
        chat_id = gr.State(None)
        shown_chat = gr.BrowserState(None, storage_key="yuan-playground-chat")
        with gr.Row(equal_height=False):
            with gr.Column(scale=3, min_width=520):
                # Your own messages can be edited in place: the conversation from there is answered again.
                chatbot = gr.Chatbot(label="Conversation", height=560, elem_id="chatbot", buttons=["copy", "copy_all"],
                                     editable="user", group_consecutive_messages=False)
                with gr.Row():
                    message = gr.Textbox(show_label=False, placeholder="Type a message and press Enter", scale=8,
                                         elem_id="chat-input")
                    send = gr.Button("Send", variant="primary", scale=1, min_width=90, elem_id="chat-send")
                    stop = gr.Button("Stop", variant="secondary", interactive=False, scale=1, min_width=90,
                                     elem_id="chat-stop")
                with gr.Row():
                    regenerate = gr.Button("Regenerate", size="sm", elem_id="chat-regenerate")
                    undo = gr.Button("Undo", size="sm", elem_id="chat-undo")
                    clear = gr.Button("Clear", size="sm", elem_id="chat-clear")
                status = gr.Markdown("", elem_id="chat-status")
                schema_on = gr.Markdown("", visible=False, elem_id="chat-schema-on")
            # Settings always in view beside the conversation, as in the playgrounds people know.
            with gr.Column(scale=2, min_width=340, elem_id="chat-settings"):
                system_prompt = gr.Textbox(label="System prompt", lines=1, max_lines=8,
                                           placeholder="Optional instructions for the model")
                presets = PresetPicker()
                controls = sampling_controls(per_row=2)
                # Right under the settings (its being on is also said beside the conversation: schema_on).
                with gr.Accordion("Structured output", open=False, elem_id="chat-structured"):
                    schema = gr.Code(value="", language="json", lines=5, elem_id="chat-schema",
                                     label="JSON Schema the reply must match (empty: free text)")
                presets.save_row(controls, api_prefix="chat")
        inputs_by_name = {**controls, SCHEMA_INPUT: schema}  # by name: API clients see named parameters

        # The sampling controls come as keyword arguments named after their fields (inputs_kwargs), so API
        # clients see named parameters without this file listing them.
        def send_message(text, history, stats, details, system_prompt, chat_id, request: gr.Request = None,
                         **sampling):
            """The browser's send: the box is emptied once, then left to what is typed while the reply streams."""
            yield from send_turn(text, history, stats, details, system_prompt, chat_id, request, sampling, gr.skip())

        def send_message_api(text, history, stats, details, system_prompt, chat_id, request: gr.Request = None,
                             **sampling):
            """The same for API clients (`/chat`), whose last answer holds the box's value: empty once sent."""
            yield from send_turn(text, history, stats, details, system_prompt, chat_id, request, sampling, "")

        def send_turn(text, history, stats, details, system_prompt, chat_id, request, sampling, box_later):
            text = message_text(text)
            if session_owner(request) and manager.busy(session_owner(request)):
                # Enter while a reply streams: the message stays in the box, to send when the reply is done.
                gr.Warning("A reply is still being written: your message stays in the box. Send it when the reply "
                           "is done, or press Stop.")
                yield (gr.skip(),) * 7
                return
            if not text.strip():
                gr.Warning("Type a message first.")
                yield display(history, stats), history, stats, "⚠️ The message is empty.", details, chat_id, text
                return
            limit = manager.max_prompt_chars
            problem = (f"The message is {len(text)} characters; the limit is {limit}." if len(text) > limit
                       else not_unicode(text, "the message") or not_unicode(system_prompt or "", "the system prompt"))
            if problem:  # refused before anything is saved: no empty chat is left behind
                gr.Warning(problem)
                yield display(history, stats), history, stats, f"⚠️ {problem}", details, chat_id, text
                return
            turn = history + [{"role": "user", "content": text}]
            # Saved as soon as it is sent, so a crash during the reply keeps the question.
            chat_id = save_turn(storage, chat_id, history, "user", text, system_prompt=system_prompt,
                                model=loaded_model_name(manager))
            final, box = None, ""  # the box is emptied once; later updates leave what is typed meanwhile alone
            for update in stream_reply(manager, storage, turn, stats, details, system_prompt, sampling, request,
                                       chat_id):
                final = update
                yield (*update, chat_id, box)
                box = box_later
            if final is not None and final[1] is turn:
                # The reply failed: keep the history as it was and give the message back to edit.
                chat_id = forget_turns(storage, chat_id, len(history))
                yield display(history, stats), history, stats, final[3], details, chat_id, text

        def regenerate_reply(history, stats, details, system_prompt, chat_id, request: gr.Request = None, **sampling):
            if not history:
                yield display(history, stats), history, stats, "Nothing to regenerate yet.", details, chat_id
                return
            if history[-1]["role"] == "assistant":
                history, stats, details = history[:-1], stats[:-1], details[: len(stats) - 1]
            # else: a reopened chat whose last reply was cut off (a crash): answer its last message now
            final = None
            for update in stream_reply(manager, storage, history, stats, details[: len(stats)], system_prompt,
                                       sampling, request, chat_id):
                final = update
                yield (*update, chat_id)
            if final is not None and final[1] is history:
                # The reply failed and the UI has dropped the old one too: so does the saved chat.
                yield (*final, forget_turns(storage, chat_id, len(history)))

        def undo_turn(history, stats, details, chat_id):
            """Drop the last exchange; its message goes back in the box, to edit and send again."""
            text, note = gr.skip(), "Removed the last turn."
            if history and history[-1]["role"] == "assistant":
                history, stats, details = history[:-1], stats[:-1], details[: len(stats) - 1]
            if history and history[-1]["role"] == "user":
                text, history = message_text(history[-1]["content"]), history[:-1]
                note = "Removed the last turn: its message is back in the box."
            chat_id = forget_turns(storage, chat_id, len(history))
            return display(history, stats), history, stats, note, details, chat_id, text

        def edit_and_resend(history, stats, details, system_prompt, chat_id, edited: gr.EditData,
                            request: gr.Request = None, **sampling):
            """A sent message edited in place: the conversation from it on is replaced by the new text's reply."""
            shown_index = edited.index[0] if isinstance(edited.index, (list, tuple)) else edited.index
            index = history_index(history, stats, shown_index)
            text = message_text(edited.value)
            if index is None or history[index]["role"] != "user" or not text.strip():
                note = "⚠️ Only a message you sent can be edited, and not to nothing."
                yield display(history, stats), history, stats, note, details, chat_id
                return
            replies_before = sum(1 for message in history[:index] if message["role"] == "assistant")
            kept, stats, details = history[:index], stats[:replies_before], details[:replies_before]
            chat_id = forget_turns(storage, chat_id, len(kept))
            turn = kept + [{"role": "user", "content": text}]
            chat_id = save_turn(storage, chat_id, kept, "user", text, system_prompt=system_prompt,
                                model=loaded_model_name(manager))
            for update in stream_reply(manager, storage, turn, stats, details, system_prompt, sampling, request,
                                       chat_id):
                yield (*update, chat_id)

        def clear_chat(request: gr.Request = None):
            streaming.clear(session_owner(request))
            # The next message starts a new saved chat; this one stays in the History tab.
            return [], [], [], "Cleared: your next message starts a new chat (this one stays in History).", [], None

        buttons = [send, regenerate, undo, clear, stop]

        def buttons_busy():
            return (*(gr.update(interactive=False) for _ in buttons[:-1]), gr.update(interactive=True, variant="stop"))

        def buttons_free():
            return (*(gr.update(interactive=True) for _ in buttons[:-1]),
                    gr.update(interactive=False, variant="secondary"))

        def buttons_idle(request: gr.Request = None):
            if session_owner(request) and manager.busy(session_owner(request)):
                return (gr.skip(),) * len(buttons)  # another reply of this page is still running
            return buttons_free()

        def stop_generation(request: gr.Request = None):
            # Answered once the reply has sent its last update, which says it was stopped: a "Stopping…" sent now
            # could arrive after that update and stay on the page.
            return gr.skip() if streaming.stop(session_owner(request)) else "Nothing is running."

        # State outputs are not part of the API, so the endpoints' visible outputs stay as they were.
        outputs = [chatbot, history, stats, status, details, chat_id]
        inputs = [history, stats, details, system_prompt, chat_id]
        # concurrency_limit=None: the manager's own queue orders generations and reports places in it.
        # Each reply greys out what must wait for it (and lights Stop) while it runs.
        streaming = ClearableReplies(manager)  # what Clear ends, answering after their last update
        send_message, send_message_api = streaming.clearable(send_message), streaming.clearable(send_message_api)
        regenerate_reply, edit_and_resend = streaming.clearable(regenerate_reply), streaming.clearable(edit_and_resend)
        send_events = []
        for trigger in (message.submit, send.click):
            trigger(buttons_busy, None, buttons, api_name=False, queue=False, show_progress="hidden")
            # trigger_mode="multiple": Enter during a reply reaches send_message, which says why it waits (the
            # default, "once", would ignore it without a word).
            send_events.append(trigger(send_message, [message, *inputs], [*outputs, message],
                                       inputs_kwargs=inputs_by_name, api_name=False, concurrency_limit=None,
                                       trigger_mode="multiple"))
            send_events[-1].then(buttons_idle, None, buttons, api_name=False, show_progress="hidden").then(
                None, None, None, js=MARK_REFUSED_JS, api_name=False)
        gr.Button(visible=False).click(send_message_api, [message, *inputs], [*outputs, message],
                                       inputs_kwargs=inputs_by_name, api_name="chat", concurrency_limit=None)
        regenerate.click(buttons_busy, None, buttons, api_name=False, queue=False, show_progress="hidden")
        regenerate_event = regenerate.click(regenerate_reply, inputs, outputs, inputs_kwargs=inputs_by_name,
                                            api_name="chat_regenerate", concurrency_limit=None)
        regenerate_event.then(buttons_idle, None, buttons, api_name=False, show_progress="hidden")
        undo.click(undo_turn, [history, stats, details, chat_id], [*outputs, message], api_name="chat_undo")
        chatbot.edit(buttons_busy, None, buttons, api_name=False, queue=False, show_progress="hidden")
        chatbot.edit(edit_and_resend, inputs, outputs, inputs_kwargs=inputs_by_name, api_name=False,
                     concurrency_limit=None).then(buttons_idle, None, buttons, api_name=False, show_progress="hidden")
        # Clear and the Chatbot's bin icon stop a reply being written (`streaming.clear`: they answer after its last
        # update, which would otherwise bring the chat back) and start afresh; `cancels` ends its Gradio event too, so
        # the buttons are set free at once, as the stopped reply's own ending never comes. No concurrency limit: one
        # page's Clear, waiting for its reply, holds up no other page's.
        replies = [*send_events, regenerate_event]
        clear.click(clear_chat, None, outputs, api_name="chat_clear", cancels=replies, concurrency_limit=None).then(
            buttons_free, None, buttons, api_name=False, show_progress="hidden")
        chatbot.clear(clear_chat, None, outputs, api_name=False, cancels=replies, concurrency_limit=None).then(
            buttons_free, None, buttons, api_name=False, show_progress="hidden")
        stop.click(stop_generation, None, status, api_name="chat_stop", queue=False)
        chat_id.change(lambda shown: shown, chat_id, shown_chat, api_name=False, show_progress="hidden")
        # Said beside the conversation, where the replies appear: a schema holds every reply to it.
        schema.change(lambda text: gr.update(value=SCHEMA_ON, visible=bool((text or "").strip())), schema, schema_on,
                      api_name=False, show_progress="hidden", queue=False)

        # Every setting is remembered in this browser as it changes (by hand, by a preset or by a reopened chat).
        remembered = gr.BrowserState({}, storage_key="yuan-playground-chat-settings")
        # Written in the page, not by a round trip to the server: two quick changes cannot land out of order (the
        # earlier one's answer arriving last took the later setting back).
        remember = ("(...values) => Object.fromEntries("
                    f"{json.dumps(list(inputs_by_name))}.map((name, i) => [name, values[i]]))")
        for control in inputs_by_name.values():
            control.change(None, list(inputs_by_name.values()), remembered, js=remember, api_name=False,
                           show_progress="hidden", queue=False)
    return ChatTab(chatbot=chatbot, history=history, stats=stats, details=details, chat_id=chat_id,
                   system_prompt=system_prompt, status=status, shown_chat=shown_chat, settings=inputs_by_name,
                   remembered=remembered, unavailable=UnavailableControls(manager, controls))
