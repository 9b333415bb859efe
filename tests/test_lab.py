"""`make lab`: JupyterLab serves notebooks/ with the jupytext sources opening as notebooks.

Starts the real server (the config `make lab` uses) on a free 127.0.0.1 port with the token
disabled, fetches the Lab page, a notebook-as-jupytext contents request and the default-viewer
setting, then stops it. Everything Jupyter writes (runtime files, workspaces) goes to tmp_path.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "jupyter" / "jupyter_lab_config.py"
START_TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 10.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def test_lab_config_is_what_make_lab_runs():
    makefile = (REPO / "Makefile").read_text()
    assert "jupyter lab --config=jupyter/jupyter_lab_config.py" in makefile
    overrides = json.loads((REPO / "jupyter" / "lab" / "settings" / "overrides.json").read_text())
    assert overrides["@jupyterlab/docmanager-extension:plugin"]["defaultViewers"]["python"] == "Jupytext Notebook"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_lab_serves_the_jupytext_sources_as_notebooks(tmp_path):
    port = _free_port()
    env = dict(os.environ, HOME=str(tmp_path), JUPYTER_CONFIG_DIR=str(tmp_path / "config"),
               JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"), JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / "ws"),
               JUPYTERLAB_SETTINGS_DIR=str(tmp_path / "user-settings"))
    cmd = [sys.executable, "-m", "jupyterlab", f"--config={CONFIG}", "--no-browser", f"--port={port}",
           "--ServerApp.port_retries=0", "--IdentityProvider.token="]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")  # containers run as root; a user's `make lab` does not need it
    log = open(tmp_path / "lab.log", "wb")
    server = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        status, page = 0, b""
        while time.monotonic() < deadline:
            assert server.poll() is None, f"jupyter lab exited: {(tmp_path / 'lab.log').read_text()[-2000:]}"
            try:
                status, page = _get(f"{base}/lab", timeout=5)
                if status == 200:
                    break
            except OSError:
                pass
            time.sleep(1)
        assert status == 200, f"no Lab page within {START_TIMEOUT_S} s"
        assert b"JupyterLab" in page
        assert b"jupyterlab-jupytext" in page  # the jupytext Lab extension is in the page config

        # The .py source, read by jupytext's contents manager as a notebook.
        status, body = _get(f"{base}/api/contents/00_quickstart.py?content=1&type=notebook")
        assert status == 200, body[:500]
        model = json.loads(body)
        assert model["type"] == "notebook"
        cells = model["content"]["cells"]
        assert cells[0]["cell_type"] == "markdown" and cells[0]["source"].startswith("# 00 · Quickstart")
        assert any("parameters" in c.get("metadata", {}).get("tags", []) for c in cells if c["cell_type"] == "code")

        # Double click opens a .py with the jupytext notebook viewer (the repo's overrides.json).
        status, body = _get(f"{base}/lab/api/settings/@jupyterlab/docmanager-extension:plugin")
        assert status == 200
        viewers = json.loads(body)["schema"]["properties"]["defaultViewers"]["default"]
        assert viewers.get("python") == "Jupytext Notebook"

        # Served from notebooks/: the listing is the sources, not the repository root.
        status, body = _get(f"{base}/api/contents/")
        names = {item["name"] for item in json.loads(body)["content"]}
        assert "00_quickstart.py" in names and "jupytext.toml" in names and "lalora" not in names
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)
        log.close()
    assert server.returncode is not None
