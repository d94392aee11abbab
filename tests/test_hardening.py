"""Hardening, against the real server: the API key alone guards the UI and its Gradio API too, the login page gives
nothing away, HEAD is answered where GET is, and huge requests are refused fast without leaving memory behind."""

from __future__ import annotations

import json
import re
import socket
import threading
import time

import httpx
import psutil
import pytest
from gradio_client import Client

from harness import ServedApp, chat_call
from playground.storage import Storage

pytestmark = pytest.mark.slow

API_KEY = "hardening-key-7"
BEARER = {"Authorization": f"Bearer {API_KEY}"}
TWENTY_MB = 20 * 1024 * 1024
CONTROLS = dict(temperature=0.0, top_p=0.9, top_k=50, min_p=0.0, typical_p=1.0, repetition_penalty=1.0,
                no_repeat_ngram_size=0, max_new_tokens=4, seed=1, stop="")


@pytest.fixture(scope="module")
def keyed(tmp_path_factory, embedded_manager):
    """An app with --api-key and no --auth, saving chats to its own data folder (the session's loaded model)."""
    data = tmp_path_factory.mktemp("keyed") / "data"
    server = ServedApp("--api-key", API_KEY, "--data-dir", str(data), manager=embedded_manager)
    server.data_dir = data
    try:
        server.wait_until(("ready",))
        yield server
    finally:
        server.stop()


def saved_chat_count(server) -> int:
    store = Storage(server.data_dir)
    try:
        return len(store.list_chats())
    finally:
        store.close()


def test_the_key_alone_guards_the_ui_and_its_api(keyed):
    # without a credential nothing reaches the model or the saved chats
    call = httpx.post(f"{keyed.url}/gradio_api/call/chat", json={"data": ["Hi", ""]}, timeout=30)
    assert call.status_code == 401, call.text
    export = httpx.post(f"{keyed.url}/gradio_api/call/chat_export", json={"data": [""]}, timeout=30)
    assert export.status_code == 401
    assert httpx.get(f"{keyed.url}/gradio_api/info", timeout=30).status_code == 401
    with pytest.raises(Exception):
        Client(keyed.url, verbose=False)
    wrong = httpx.post(f"{keyed.url}/login", data={"username": "me", "password": "not-the-key"}, timeout=30)
    assert wrong.status_code == 400
    # the key is the password (any user name), for a browser and for gradio_client alike
    client = Client(keyed.url, auth=("anyone", API_KEY), verbose=False)
    chat, status, _ = client.predict(**chat_call("Say hi.", **CONTROLS), api_name="/chat")
    assert status.startswith("Done:"), status
    path, note = client.predict("", api_name="/chat_export")
    assert path and "Exported 1 chat" in note
    # the APIs still take the bearer key
    assert httpx.get(f"{keyed.url}/healthz", headers=BEARER, timeout=30).json()["state"] == "ready"
    assert httpx.get(f"{keyed.url}/healthz", timeout=30).status_code == 401


def test_login_page_gives_nothing_away(keyed):
    page = httpx.get(f"{keyed.url}/", timeout=30)
    assert page.status_code == 200 and '"auth_required"' in page.text.replace(" ", "")
    assert "gradio_api_info = null;" in page.text
    for secret in ("chat_export", "named_endpoints", "/lab_run", "balanced"):  # endpoints, preset names
        assert secret not in page.text, secret
    # once logged in the page is whole again
    with httpx.Client(base_url=keyed.url, timeout=30) as browser:
        assert browser.post("/login", data={"username": "me", "password": API_KEY}).status_code == 200
        assert "chat_export" in browser.get("/").text


def test_schema_pages_are_off_with_a_key(keyed):
    for path in ("/openapi.json", "/docs", "/redoc"):
        response = httpx.get(f"{keyed.url}{path}", timeout=30)
        assert response.status_code == 404, (path, response.text[:200])
        assert response.json()["error"]["code"] == "not_found"


def test_head_is_answered_where_get_is(keyed):
    for path in ("/healthz", "/v1/models"):
        head = httpx.head(f"{keyed.url}{path}", headers=BEARER, timeout=30)
        assert head.status_code == 200 and head.content == b"", path
        assert httpx.head(f"{keyed.url}{path}", timeout=30).status_code == 401  # the key still applies
    wrong = httpx.get(f"{keyed.url}/v1/chat/completions", headers=BEARER, timeout=30)
    assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"
    assert wrong.json()["error"]["code"] == "method_not_allowed"


def test_a_chat_with_a_lone_surrogate_leaves_no_empty_chat(keyed):
    before = saved_chat_count(keyed)
    # the escape travels as a browser sends it
    body = json.dumps({"data": ["hello", "be kind \udc00", *CONTROLS.values(), ""]}).encode()
    with httpx.Client(base_url=keyed.url, timeout=30) as browser:
        browser.post("/login", data={"username": "me", "password": API_KEY})
        event = browser.post("/gradio_api/call/chat", content=body,
                             headers={"Content-Type": "application/json"}).json()["event_id"]
        answer = browser.get(f"/gradio_api/call/chat/{event}").text
    assert "the system prompt contains" in answer and "surrogate" in answer, answer[-500:]
    assert saved_chat_count(keyed) == before


def send_huge(url: str, size: int) -> tuple[int, float, str]:
    """POST `size` bytes of one JSON prompt, as a client streams it; returns (status, seconds, reason)."""
    started = time.monotonic()
    payload = b'{"messages": [{"role": "user", "content": "' + b"a" * size + b'"}]}'
    try:
        response = httpx.post(f"{url}/v1/chat/completions", content=payload, headers={**BEARER,
                              "Content-Type": "application/json"}, timeout=60)
        return response.status_code, time.monotonic() - started, response.json()["error"]["message"]
    except (httpx.WriteError, httpx.RemoteProtocolError) as exc:  # the server answered before the upload ended
        return 413, time.monotonic() - started, str(exc)


def chunked_upload(port: int, size: int) -> str:
    """A body without Content-Length (chunked), bigger than the limit: refused once the limit is passed."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
        connection.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                           b"Content-Type: application/json\r\nAuthorization: Bearer " + API_KEY.encode() + b"\r\n\r\n")
        chunk = b"a" * (1024 * 1024)
        try:
            for _ in range(size // len(chunk)):
                connection.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        except OSError:
            pass  # the server closed the connection after answering
        return connection.recv(4096).decode(errors="replace")


def test_huge_requests_are_refused_fast_and_leave_no_memory_behind(keyed):
    process = psutil.Process()  # the app is served from this process
    before = process.memory_info().rss
    results: list[tuple[int, float, str]] = []
    threads = [threading.Thread(target=lambda: results.append(send_huge(keyed.url, TWENTY_MB))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [status for status, _, _ in results] == [413] * 3, results
    assert all(seconds < 10 for _, seconds, _ in results), results
    answered = [reason for _, _, reason in results if "limit" in reason]
    assert all("the limit is 8388608 bytes (the server's --max-request-bytes)" in reason for reason in answered)
    assert re.match(r"HTTP/1.1 413", chunked_upload(keyed.port, 12 * 1024 * 1024))
    after = process.memory_info().rss
    slowest = max(seconds for _, seconds, _ in results)
    print(f"\n3 x 20 MB refused, slowest in {slowest:.2f} s; RSS before {before / 2**20:.0f} MiB, "
          f"after (and one chunked 12 MB): {after / 2**20:.0f} MiB")
    assert after - before < 2**30
    assert httpx.get(f"{keyed.url}/healthz", headers=BEARER, timeout=5).json()["state"] == "ready"


def test_the_import_button_takes_what_the_request_limit_lets_through(embedded_manager, tmp_path):
    """The History tab's import limit is the server's request limit less an upload's framing: a file of exactly that
    size uploads, one over the request limit is refused (413), and an export larger than it says so."""
    from playground.config import DEFAULT_MAX_REQUEST_BYTES
    from playground.storage_exchange import MAX_IMPORT_BYTES, import_limit_bytes
    from playground.ui.history_views import HistoryViews

    limit = import_limit_bytes(DEFAULT_MAX_REQUEST_BYTES)
    assert DEFAULT_MAX_REQUEST_BYTES - 2**17 < limit < DEFAULT_MAX_REQUEST_BYTES
    assert import_limit_bytes(None) == import_limit_bytes(2**30) == MAX_IMPORT_BYTES
    server = ServedApp("--data-dir", str(tmp_path / "data"), manager=embedded_manager)
    try:
        fits = httpx.post(f"{server.url}/gradio_api/upload", timeout=60,
                          files={"files": ("chats.json", b" " * limit, "application/json")})
        assert fits.status_code == 200, fits.text
        over = httpx.post(f"{server.url}/gradio_api/upload", timeout=60,
                          files={"files": ("chats.json", b" " * DEFAULT_MAX_REQUEST_BYTES, "application/json")})
        assert over.status_code == 413
    finally:
        server.stop()
    store = Storage(tmp_path / "export")
    try:
        chat_id = store.create_chat(model="tiny")
        store.put_message(chat_id, 0, "user", "x" * 2000)
        path, note = HistoryViews(embedded_manager, store, import_limit=1000).export_chats("")
        assert path and "more than this server imports" in note and "--max-request-bytes" in note
    finally:
        store.close()
