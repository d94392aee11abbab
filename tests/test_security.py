"""Security: loopback by default, a login in front of the UI, the API key on every API route, models loaded from the
UI only from under --models-root (safetensors/GGUF only), and no remote code anywhere."""

from __future__ import annotations

import re
import shutil

import httpx
import psutil
import pytest
from gradio_client import Client

from harness import LaunchedServer
from playground.config import parse_args
from playground.model_loading import EMBEDDED
from playground.ui.model_panel import ENABLE_HINT, ModelChoiceError, model_choices, resolve_choice

API_KEY = "security-key-42"
BEARER = {"Authorization": f"Bearer {API_KEY}"}
LOGINS = {"alice": "wonder:land", "bob": "b0b"}  # from the auth file (a password may hold ':')
ENV_LOGIN = ("carol", "c4rol")  # from PLAYGROUND_AUTH


@pytest.fixture(scope="module")
def models_root(tmp_path_factory, tiny_folder):
    """tiny: a loadable folder; pickle_only: weights only as pytorch_model.bin; escape: a symlink to a model
    outside the root; sneaky: a folder whose config.json links outside the root."""
    base = tmp_path_factory.mktemp("security")
    root = base / "models"
    root.mkdir()
    shutil.copytree(tiny_folder, root / "tiny")
    pickle_only = root / "pickle_only"
    pickle_only.mkdir()
    shutil.copy(tiny_folder / "config.json", pickle_only / "config.json")
    (pickle_only / "pytorch_model.bin").write_bytes(b"PK\x03\x04 not to be unpickled")
    outside = base / "outside-model"
    shutil.copytree(tiny_folder, outside)
    (root / "escape").symlink_to(outside, target_is_directory=True)
    sneaky = root / "sneaky"
    sneaky.mkdir()
    (sneaky / "config.json").symlink_to(outside / "config.json")
    (sneaky / "model.safetensors").symlink_to(outside / "model.safetensors")
    return root


@pytest.fixture(scope="module")
def guarded(tmp_path_factory, models_root):
    """A server started without --host, with logins, an API key and a models root."""
    logs = tmp_path_factory.mktemp("guarded")
    auth_file = logs / "logins.txt"
    auth_file.write_text("# users\n" + "".join(f"{user}:{password}\n" for user, password in LOGINS.items()))
    server = LaunchedServer("--auth-file", str(auth_file), "--api-key", API_KEY, "--models-root", str(models_root),
                            env={"PLAYGROUND_AUTH": ":".join(ENV_LOGIN), "PLAYGROUND_HOST": "", "SPACE_ID": ""},
                            log_dir=logs, host=None)
    try:
        server.wait_until(("ready",))
        yield server
    finally:
        server.stop()


# --------------------------------------------------------------------------------------------- binding


def test_binds_loopback_unless_told_otherwise(guarded, monkeypatch):
    assert "--host" not in guarded.args
    listening = [c.laddr for c in psutil.Process(guarded.process.pid).net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN]
    assert listening and all(address.ip == "127.0.0.1" for address in listening), listening
    for name in ("PLAYGROUND_HOST", "SPACE_ID"):
        monkeypatch.delenv(name, raising=False)
    assert parse_args([]).host == "127.0.0.1"
    assert parse_args(["--host", "0.0.0.0"]).host == "0.0.0.0"


# ------------------------------------------------------------------------------------------- the login


def test_login_options_and_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("PLAYGROUND_AUTH", raising=False)
    assert parse_args([]).auth is None
    assert parse_args(["--auth", "ann:pa:ss"]).auth == [("ann", "pa:ss")]
    monkeypatch.setenv("PLAYGROUND_AUTH", "env:secret")
    logins = tmp_path / "logins"
    logins.write_text("a:1\n\n# comment\nb:2\n")
    assert parse_args(["--auth-file", str(logins)]).auth == [("env", "secret"), ("a", "1"), ("b", "2")]
    for bad in (["--auth", "no-password"], ["--auth-file", str(tmp_path / "missing")]):
        with pytest.raises(SystemExit):
            parse_args(bad)
    logins.write_text("a:1\njust-a-name\n")
    with pytest.raises(SystemExit):
        parse_args(["--auth-file", str(logins)])


def test_the_ui_needs_a_login(guarded):
    config = httpx.get(f"{guarded.url}/config", timeout=30)  # the app's layout: nothing of it before a login
    assert config.status_code == 401 and "Not authenticated" in config.text
    assert httpx.get(f"{guarded.url}/gradio_api/info", timeout=30).status_code == 401
    with pytest.raises(Exception):
        Client(guarded.url, verbose=False)
    wrong = httpx.post(f"{guarded.url}/login", data={"username": "alice", "password": "nope"}, timeout=30)
    assert wrong.status_code == 400 and "Incorrect credentials" in wrong.text
    for user, password in [*LOGINS.items(), ENV_LOGIN]:
        client = Client(guarded.url, auth=(user, password), verbose=False)
        assert "SmolLM2" in client.predict(api_name="/status")


# ----------------------------------------------------------------------------------------- the API key


@pytest.mark.parametrize(("method", "path", "body"), [
    ("GET", "/healthz", None),
    ("GET", "/v1/models", None),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}),
    ("POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 2}),
    ("POST", "/", {"prompt": "Hi", "max_new_tokens": 2}),
])
def test_the_api_key_covers_every_api_route(guarded, method, path, body):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        refused = httpx.request(method, f"{guarded.url}{path}", json=body, headers=headers, timeout=60)
        assert refused.status_code == 401, refused.text
        assert refused.json()["error"]["type"] == "authentication_error"
    allowed = httpx.request(method, f"{guarded.url}{path}", json=body, headers=BEARER, timeout=60)
    assert allowed.status_code == 200, allowed.text


def test_no_open_api_schema_with_a_key(guarded):
    # (Gradio's own app may answer /openapi.json with its internal routes; the APIs' schema is not shown.)
    for path in ("/openapi.json", "/docs", "/redoc"):
        response = httpx.get(f"{guarded.url}{path}", timeout=30)
        assert "/v1/chat/completions" not in response.text, path


# ---------------------------------------------------------------------------------------- the model panel


def test_panel_lists_only_what_lies_under_the_root(models_root):
    assert model_choices(None) == [EMBEDDED]
    assert model_choices(str(models_root)) == [EMBEDDED, "pickle_only", "sneaky", "tiny"]  # not "escape"


@pytest.mark.parametrize(("choice", "reason"), [
    ("/etc", "not a path"),
    ("../outside-model", "not a path"),
    ("..", "not a path"),
    ("tiny/../../outside-model", "not a path"),
    ("escape", "points outside the models root"),
    ("sneaky", "outside the models root"),
    ("nothing-here", "there is no"),
    ("m" * 5000, "at most 255 characters"),
    ("model \ud800", "surrogate pair"),
    ("", "choose a model"),
])
def test_panel_refuses_paths_outside_the_root(models_root, choice, reason):
    with pytest.raises(ModelChoiceError, match=re.escape(reason)):
        resolve_choice(choice, str(models_root))


def test_panel_without_a_root_offers_only_the_embedded_model():
    assert resolve_choice(EMBEDDED, None) is None
    with pytest.raises(ModelChoiceError, match=re.escape(ENABLE_HINT)):
        resolve_choice("tiny", None)


def test_panel_loads_from_the_root_only_safetensors(guarded):
    client = Client(guarded.url, auth=next(iter(LOGINS.items())), verbose=False)
    for choice, reason in (("../outside-model", "not a path"), ("escape", "outside the models root"),
                           ("sneaky", "outside the models root"),
                           ("pickle_only", "only safetensors are read, never pickle")):
        message = client.predict(choice, api_name="/model_load")
        assert message.startswith("⚠️") and reason in message, message
        assert guarded.status()["name"] == "SmolLM2-135M-Instruct"
    loaded = client.predict("tiny", api_name="/model_load")
    assert loaded.startswith("✅ Loaded **tiny**"), loaded
    assert guarded.status()["name"] == "tiny"
    assert client.predict(EMBEDDED, api_name="/model_load").startswith("✅ Loaded")
    assert guarded.status()["name"] == "SmolLM2-135M-Instruct"
    load_time = guarded.status()["load_time_s"]
    assert "already loaded" in client.predict(EMBEDDED, api_name="/model_load")  # not loaded a second time
    assert guarded.status()["load_time_s"] == load_time


# ----------------------------------------------------------------------------------------- remote code


def test_a_folder_asking_for_remote_code_never_runs_it(new_manager, tiny_folder, tmp_path):
    """A transformers folder whose config names remote code (auto_map) is refused with the reason, and the remote
    module is never imported: it would leave a marker file."""
    import json

    from playground.errors import ModelFolderError

    folder = tmp_path / "remote-code"
    shutil.copytree(tiny_folder, folder)
    marker = tmp_path / "remote-code-ran"
    (folder / "configuration_custom.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nraise RuntimeError('remote code ran')\n", encoding="utf-8")
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config["auto_map"] = {"AutoConfig": "configuration_custom.CustomConfig"}
    config["model_type"] = "custom-remote"
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    manager = new_manager()
    with pytest.raises(ModelFolderError, match="remote-code"):
        manager.load(folder)
    assert not marker.exists()
    assert "trust_remote_code" in manager.status()["last_error"]  # the reason names what it would take