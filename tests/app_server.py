"""The chat app (`python -m app`) as a real server for the app's tests: started in its own process group on a free
port against a demo store, ready when /health answers; and how a test talks to its /chat endpoint.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests
from gradio_client import Client

REPO = Path(__file__).resolve().parents[1]
SEQUENCE_LEN = 256
TIME = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"  # app.TIME_FORMAT: 24-hour (UTC)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AppServer:
    """`python -m app` in its own process group; stopped (by its pid) when the module's tests are done."""

    def __init__(self, demo: dict, cache: Path, log: Path, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "NANOCHAT_ARTIFACT_CACHE": str(cache), "GRADIO_ANALYTICS_ENABLED": "False",
               "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "app", "--port", str(self.port), "--artifacts", str(demo["store"].root),
               "--duckdb", str(demo["db_path"]), "--threads", "1", "--poll-seconds", "1", *args]
        self.log = log
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the app exited with {self.proc.returncode}:\n{self.log.read_text()[-4000:]}")
            try:
                if requests.get(f"{self.url}/health", timeout=2).ok:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"the app did not answer /health in {timeout} s:\n{self.log.read_text()[-4000:]}")

    def health(self) -> dict:
        return requests.get(f"{self.url}/health", timeout=10).json()

    def client(self) -> Client:
        return Client(self.url + "/", verbose=False)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def chat(client: Client, message: str, max_tokens: int = 24, temperature: float = 0.8) -> tuple:
    """One /chat call: (textbox, chatbot messages, status)."""
    return client.predict(message, temperature, 50, max_tokens, api_name="/chat")


def text_of(message: dict) -> str:
    content = message["content"]
    return content if isinstance(content, str) else "".join(p.get("text", "") for p in content)
