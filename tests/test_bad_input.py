"""Bad input, table-driven: every row is refused with a message that says why, and the server keeps serving.

UI rows go through gradio_client to the launched app's event functions and read the status text (or Gradio's own
validation error); API rows go through httpx and expect a 4xx whose body gives the reason. After each row the
server must still answer /healthz with the model loaded and nothing left running.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import httpx
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from harness import chat_call

from playground.presets import user_presets_dir
from playground.ui.lab_tab import SETTING_FIELDS

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
ONE_MB = "a" * 1_000_000
OVER_CONTEXT = "word " * 9000  # about 9000 tokens: more than the embedded model's 8192, under the UI's char limit
CHAT = [{"role": "user", "content": "Hi"}]
# The chat endpoint's inputs after the message and system prompt, in the UI's order.
CHAT_CONTROLS = dict(temperature=0.0, top_p=0.9, top_k=50, min_p=0.0, typical_p=1.0, repetition_penalty=1.0,
                     no_repeat_ngram_size=0, max_new_tokens=8, seed=1, stop="")
LAB_ROW = dict(temperature=0.0, top_p=0.9, top_k=50, min_p=0.0, typical_p=1.0, repetition_penalty=1.0,
               no_repeat_ngram_size=0, max_new_tokens=8, seed=1)


@dataclass
class Case:
    id: str
    run: Callable[[Any], str]  # UI rows: (client) -> message shown; API rows: (server) -> error message
    expect: str  # a fragment of the message (case-insensitive)


# ------------------------------------------------------------------------------------------------- the UI


def ui_message(call: Callable[[], Any], pick: Callable[[Any], str]) -> str:
    """The message a user sees: the event's status output, or Gradio's own validation error."""
    try:
        return pick(call())
    except AppError as error:
        return str(error)


def chat(message: str = "Hello", system: str = "", **controls) -> Callable[[Client], str]:
    values = {**CHAT_CONTROLS, **controls}
    return lambda client: ui_message(
        lambda: client.predict(**chat_call(message, system, **values), api_name="/chat"), lambda out: out[1])


def raw_chat(message: str = "Hello", system: str = "", **controls) -> Callable[[Client], str]:
    """Through Gradio's REST API, for values gradio_client refuses to send but a browser's JSON can hold
    (NaN, lone UTF-16 surrogates written as \\udxxx escapes)."""

    def run(client: Client) -> str:
        base = client.src.rstrip("/")
        data = [message, system, *{**CHAT_CONTROLS, **controls}.values(), ""]  # the last: no structured output
        body = json.dumps({"data": data}).encode()  # escapes surrogates; writes NaN as the literal NaN
        event_id = httpx.post(f"{base}/gradio_api/call/chat", content=body, timeout=30,
                              headers={"Content-Type": "application/json"}).json()["event_id"]
        kind = payload = None
        with httpx.stream("GET", f"{base}/gradio_api/call/chat/{event_id}", timeout=60) as stream:
            for line in stream.iter_lines():
                if line.startswith("event: "):
                    kind = line.removeprefix("event: ")
                elif line.startswith("data: "):
                    payload = json.loads(line.removeprefix("data: "))
        if kind == "error":
            return str(payload)
        return next(value for value in payload if isinstance(value, str))  # the status line comes first

    return run


def lab(prompt: str = "Hi", rows: list[dict] | None = None) -> Callable[[Client], str]:
    table = {"headers": SETTING_FIELDS,
             "data": [[row.get(f, "") for f in SETTING_FIELDS] for row in (rows or [LAB_ROW, LAB_ROW])]}
    return lambda client: ui_message(lambda: client.predict(prompt, table, api_name="/lab_run"), lambda out: out[14])


def sweep(parameter: str, values: str) -> Callable[[Client], str]:
    table = {"headers": SETTING_FIELDS, "data": [[LAB_ROW[f] for f in SETTING_FIELDS]]}
    return lambda client: ui_message(lambda: client.predict(table, parameter, values, api_name="/lab_sweep"),
                                     lambda out: out[1])


def explore(text: str) -> Callable[[Client], str]:
    return lambda client: ui_message(lambda: client.predict(text, temperature=1.0, top_k=50, top_p=1.0, min_p=0.0,
                                                                     repetition_penalty=1.0, top_n=10, api_name="/explore"),
                                     lambda out: out[3])


def preset_file(content: bytes) -> Callable[[Client], str]:
    """Write a broken user preset file: it is left out of the list, and applying any preset names it and its fault."""

    def run(client: Client) -> str:
        folder = user_presets_dir()
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"bad-input-{uuid.uuid4().hex[:8]}.json"
        path.write_bytes(content)
        try:
            message = ui_message(lambda: client.predict("greedy", api_name="/chat_preset"), lambda out: out[-1])
        finally:
            path.unlink()
        assert path.name in message, message  # the message names the file at fault
        return message

    return run


def save_preset(name: str) -> Callable[[Client], str]:
    return lambda client: ui_message(
        lambda: client.predict(preset_name=name, **CHAT_CONTROLS, api_name="/chat_preset_save"), lambda out: out[1])


def import_file(content: bytes) -> Callable[[Client], str]:
    """Upload a broken chat export to the History tab's import."""

    def run(client: Client) -> str:
        path = Path(tempfile.mkdtemp(prefix="bad-import-")) / "chats.json"
        path.write_bytes(content)
        return ui_message(lambda: client.predict(handle_file(str(path)), api_name="/chat_import"),
                          lambda out: out[0])

    return run


def load_model(choice: str) -> Callable[[Client], str]:
    return lambda client: ui_message(lambda: client.predict(choice, api_name="/model_load"), lambda out: out)


UI_CASES = [
    Case("chat-empty", chat(""), "empty"),
    Case("chat-whitespace", chat("  \n\t "), "empty"),
    Case("chat-1mb", chat(ONE_MB), "the limit is 100000"),
    Case("chat-over-context", chat(OVER_CONTEXT), "context is 8192 tokens"),
    Case("chat-system-over-context", chat("Hi", system=OVER_CONTEXT), "context is 8192 tokens"),
    Case("chat-lone-surrogate", raw_chat("hello \ud800"), "surrogate"),
    Case("chat-system-surrogate", raw_chat("hello", system="be kind \udc00"), "the system prompt contains"),
    # Values a slider cannot take are refused by Gradio itself, naming the bound.
    Case("chat-temperature-high", chat(temperature=9.0), "temperature: must be between 0 and 5 (0 means greedy), got 9"),
    Case("chat-temperature-nan", raw_chat(temperature=math.nan), "temperature"),
    Case("chat-temperature-text", chat(temperature="hot"), "temperature: must be between 0 and 5"),
    Case("chat-top-p-zero", chat(top_p=0.0), "top_p: must be greater than 0 and at most 1"),
    Case("chat-top-k-negative", chat(top_k=-1), "top_k: must be an integer between 0 and 10000"),
    Case("chat-max-new-tokens-zero", chat(max_new_tokens=0), "max_new_tokens: must be an integer between 1 and 8192"),
    Case("chat-max-new-tokens-over", chat(max_new_tokens=9000), "max_new_tokens: must be an integer between 1 and 8192"),
    Case("chat-repetition-penalty-zero", chat(repetition_penalty=0.0), "repetition_penalty: must be greater than 0"),
    Case("chat-seed-negative", chat(seed=-1), "seed"),
    Case("chat-seed-too-big", chat(seed=2**40), "seed"),
    Case("chat-seed-fraction", chat(seed=1.5), "seed"),
    Case("chat-too-many-stops", chat(stop="\n".join(f"s{i}" for i in range(20))), "at most 16 stop strings"),
    Case("chat-stop-too-long", chat(stop="x" * 300), "stop"),
    Case("lab-empty-prompt", lab("   "), "empty"),
    Case("lab-1mb-prompt", lab(ONE_MB), "the limit is 100000"),
    Case("lab-text-in-number-cell", lab(rows=[{**LAB_ROW, "temperature": "warm"}]), "setting 1: temperature: must be between 0 and 5"),
    Case("lab-negative-cell", lab(rows=[{**LAB_ROW, "top_p": -1}]), "setting 1: top_p"),
    Case("lab-fractional-int", lab(rows=[{**LAB_ROW, "max_new_tokens": 2.5}]), "whole number"),
    Case("lab-too-many-rows", lab(rows=[LAB_ROW] * 7), "1 to 6 settings"),
    Case("lab-out-of-range", lab(rows=[LAB_ROW, {**LAB_ROW, "min_p": 3}]), "setting 2: min_p"),
    Case("sweep-unknown-parameter", sweep("batch_size", "1, 2"), "not in the list of choices"),
    Case("sweep-not-numbers", sweep("temperature", "low, high"), "not a number"),
    Case("sweep-out-of-range", sweep("top_k", "5, -3"), "top_k"),
    Case("explore-empty", explore(" "), "empty"),
    Case("explore-over-context", explore(OVER_CONTEXT), "context is 8192 tokens"),
    Case("preset-not-json", preset_file(b'{"params": {"temperature": 0.5'), "not valid JSON"),
    Case("preset-not-utf8", preset_file(b'{"params": {"temperature": 0.5}, "name": "\xff\xfe"}'), "cannot be read"),
    Case("preset-out-of-range", preset_file(b'{"params": {"temperature": 50}}'), "temperature"),
    Case("preset-wrong-shape", preset_file(b'{"params": [0.5]}'), '"params" object'),
    Case("preset-save-path-name", save_preset("../../etc/evil"), "a preset name is"),
    Case("preset-save-empty-name", save_preset("  "), "give the preset a name"),
    Case("import-nan", import_file(b'{"format": "yuan-playground-chat", "version": 1, "chats": [{"messages": '
                                   b'[{"role": "user", "content": "x", "stats": {"total_s": NaN}}]}]}'),
         "not strict JSON"),
    Case("import-surrogate", import_file(b'{"format": "yuan-playground-chat", "version": 1, "chats": [{"messages": '
                                         b'[{"role": "user", "content": "x \\ud800"}]}]}'), "surrogate"),
    Case("import-not-json", import_file(b'{"format": "yuan-playground-chat", '), "import failed"),
    Case("import-not-utf8", import_file(b'{"format": "yuan-playground-chat", "title": "\xff"}'), "import failed"),
    Case("import-wrong-format", import_file(b'{"format": "something-else", "version": 1, "chats": []}'),
         "import failed"),
    Case("import-unknown-role", import_file(json.dumps({"format": "yuan-playground-chat", "version": 1, "chats": [
        {"messages": [{"role": "robot", "content": "beep"}]}]}).encode()), "import failed"),
    Case("model-load-long-name", load_model("m" * 5000), "at most 255 characters"),
    Case("model-load-path", load_model("/etc"), "--models-root"),
    Case("model-load-traversal", load_model("../../"), "--models-root"),
]


# ----------------------------------------------------------------------------------------------- the APIs


def request(method: str, path: str, body: Any = None, raw: bytes | None = None,
            content_type: str = "application/json", status: int = 400) -> Callable[[Any], str]:
    """An API call that must fail with `status` and a reason; returns the reason."""

    def run(server) -> str:
        # json.dumps escapes non-ASCII, so lone surrogates travel as \\udxxx exactly as a JS client sends them.
        content = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        response = httpx.request(method, f"{server.url}{path}", content=content, timeout=60,
                                 headers={"Content-Type": content_type} if content is not None else {})
        assert response.status_code == status, response.text[:500]
        answer = response.json()
        return answer["error"]["message"] if "error" in answer else str(answer["detail"])

    return run


def chat_api(**fields) -> Callable[[Any], str]:
    return request("POST", "/v1/chat/completions", {"messages": CHAT, "max_tokens": 4, **fields})


def seed_api(**fields) -> Callable[[Any], str]:
    return request("POST", "/", {"prompt": "Hi", "max_new_tokens": 4, **fields})


API_CASES = [
    Case("api-malformed-json-chat", request("POST", "/v1/chat/completions", raw=b'{"messages": ['), "malformed JSON"),
    Case("api-malformed-json-seed", request("POST", "/", raw=b'{"prompt": "Hi",}'), "malformed JSON"),
    Case("api-not-utf8-bytes", request("POST", "/v1/chat/completions",
                                       raw=b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}'), "UTF-8"),
    Case("api-not-utf8-seed", request("POST", "/", raw=b'{"prompt": "caf\xe9"}'), "UTF-8"),
    Case("api-lone-surrogate-chat", chat_api(messages=[{"role": "user", "content": "hi \ud800"}]), "surrogate"),
    Case("api-lone-surrogate-completion", request("POST", "/v1/completions", {"prompt": "x \udfff", "max_tokens": 2}),
         "surrogate"),
    Case("api-text-plain", request("POST", "/v1/chat/completions", raw=b'{"messages": []}', content_type="text/plain"),
         "Content-Type: application/json"),
    Case("api-form-encoded", request("POST", "/v1/completions", raw=b"prompt=hi",
                                     content_type="application/x-www-form-urlencoded"), "JSON object"),
    Case("api-array-body", request("POST", "/", [1, 2]), "JSON object"),
    Case("api-unknown-route", request("GET", "/v1/engines", status=404), "Not Found"),
    Case("api-unknown-post-route", request("POST", "/v1/embeddings", {"input": "x"}, status=404), "Not Found"),
    Case("api-unknown-model", request("POST", "/v1/chat/completions", {"messages": CHAT, "model": "gpt-4o"},
                                      status=404), "gpt-4o"),
    Case("api-unknown-model-completion", request("POST", "/v1/completions", {"model": "x", "prompt": "Hi"}, status=404),
         "does not exist"),
    Case("api-temperature-nan", request("POST", "/v1/chat/completions",
                                        raw=b'{"messages": [{"role": "user", "content": "Hi"}], "temperature": NaN}'),
         "temperature"),
    Case("api-temperature-infinity", request("POST", "/", raw=b'{"prompt": "Hi", "temperature": Infinity}'),
         "temperature"),
    Case("api-temperature-text", chat_api(temperature="hot"), "temperature"),
    Case("api-temperature-high", seed_api(temperature=7), "between 0 and 5"),
    Case("api-top-p-zero", chat_api(top_p=0), "top_p"),
    Case("api-top-k-fraction", chat_api(top_k=1.5), "top_k"),
    Case("api-top-k-bool", chat_api(top_k=True), "top_k"),
    Case("api-min-p-above-one", chat_api(min_p=2), "min_p"),
    Case("api-typical-p-zero", seed_api(typical_p=0), "typical_p"),
    Case("api-repetition-penalty-negative", seed_api(repetition_penalty=-1), "repetition_penalty"),
    Case("api-no-repeat-ngram-huge", seed_api(no_repeat_ngram_size=100), "no_repeat_ngram_size"),
    Case("api-max-tokens-zero", chat_api(max_tokens=0), "max_tokens"),
    Case("api-max-tokens-huge", chat_api(max_tokens=10**12), "max_tokens"),
    Case("api-seed-negative", chat_api(seed=-5), "seed"),
    Case("api-stop-empty-string", chat_api(stop=[""]), "stop"),
    Case("api-stop-too-many", chat_api(stop=["x"] * 40), "at most 16"),
    Case("api-message-1mb", chat_api(messages=[{"role": "user", "content": ONE_MB}]), "the limit is 100000"),
    Case("api-seed-prompt-1mb", seed_api(prompt=ONE_MB), "the limit is 100000"),
    Case("api-history-over-limit", seed_api(history=["a" * 60_000, "b" * 60_000]), "the limit is 100000"),
    Case("api-body-too-large", request("POST", "/v1/chat/completions", raw=b" " * (9 * 2**20), status=413),
         "the limit is 8388608 bytes"),
    Case("api-body-too-large-seed", request("POST", "/", raw=b" " * (9 * 2**20), status=413), "--max-request-bytes"),
    Case("api-stop-surrogate", chat_api(stop=["\ud800"]), "surrogate"),
    Case("api-stop-surrogate-streaming", chat_api(stop=["\ud800"], stream=True), "surrogate"),
    Case("api-stop-surrogate-seed", seed_api(stop="end \udfff"), "surrogate"),
    Case("api-system-surrogate", chat_api(messages=[{"role": "system", "content": "\ud800"}, *CHAT]), "surrogate"),
    Case("api-get-chat-completions", request("GET", "/v1/chat/completions", status=405), "use POST"),
    Case("api-put-chat-completions", request("PUT", "/v1/chat/completions", {}, status=405), "use POST"),
    Case("api-delete-models", request("DELETE", "/v1/models", status=405), "use GET, HEAD"),
    Case("api-post-models", request("POST", "/v1/models", {}, status=405), "use GET, HEAD"),
    Case("api-post-healthz", request("POST", "/healthz", {}, status=405), "use GET, HEAD"),
    Case("api-options-models", request("OPTIONS", "/v1/models", status=405), "not allowed"),
    Case("api-completion-over-context", request("POST", "/v1/completions", {"prompt": OVER_CONTEXT, "max_tokens": 4}),
         "context"),
    Case("api-whitespace-messages", chat_api(messages=[{"role": "user", "content": "  \n "}]), "whitespace"),
    Case("api-whitespace-seed-prompt", seed_api(prompt="   "), "whitespace"),
    Case("api-no-messages", chat_api(messages=[]), "messages"),
    Case("api-content-wrong-type", chat_api(messages=[{"role": "user", "content": 123}]), "valid string"),
    Case("api-unknown-role", chat_api(messages=[{"role": "robot", "content": "Hi"}]), "role"),
    Case("api-misspelt-seed-field", seed_api(max_tokens=4), "not a field"),
]


# ------------------------------------------------------------------------------------------------ the test


@pytest.fixture(scope="module")
def client(launched_server) -> Client:
    return Client(launched_server.url, verbose=False)


def assert_still_serving(server) -> None:
    """The model is loaded and the row left nothing running or waiting."""
    deadline = time.monotonic() + 10
    while True:
        status = server.status()
        if status["state"] == "ready" and status["name"] == MODEL and status["running"] == status["queued"] == 0:
            return
        assert time.monotonic() < deadline, f"server not idle and ready after a bad input: {status}"
        time.sleep(0.1)


@pytest.mark.parametrize("case", UI_CASES, ids=[case.id for case in UI_CASES])
def test_ui_refuses_bad_input_clearly(case: Case, client, launched_server):
    message = case.run(client)
    assert case.expect.lower() in message.lower(), message[:500]
    assert "Traceback" not in message
    assert_still_serving(launched_server)


@pytest.mark.parametrize("case", API_CASES, ids=[case.id for case in API_CASES])
def test_api_refuses_bad_input_with_a_reason(case: Case, launched_server):
    message = case.run(launched_server)
    assert case.expect.lower() in message.lower(), message[:500]
    assert "internal error" not in message
    assert_still_serving(launched_server)


def test_control_characters_are_just_text(client, launched_server):
    """Control characters are valid Unicode: they reach the model and get a reply, in the UI and the API."""
    text = "Say hi\x00\x07\x1b[31m\x7f\u200b"
    chat_out = client.predict(**chat_call(text, **CHAT_CONTROLS), api_name="/chat")
    assert chat_out[1].startswith("Done:"), chat_out[1]
    response = httpx.post(f"{launched_server.url}/v1/chat/completions",
                          json={"messages": [{"role": "user", "content": text}], "max_tokens": 4, "temperature": 0},
                          timeout=60)
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] > 0
    assert_still_serving(launched_server)
