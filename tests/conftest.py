"""Shared fixtures: the default models (pulled once into the normal cache) and a real server.

The server is a subprocess (`python -m service serve`) on a free loopback port, shared by the
whole session: the model loads once and the tests talk to it exactly as clients do.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from service.config import Settings
from service.pool.manifest import Registry
from service.pool.sources import pull

ROOT = Path(__file__).resolve().parent.parent
CHAT_MODEL = "smollm2-135m-instruct"
EMBED_MODEL = "all-minilm-l6-v2"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def settings() -> Settings:
    return Settings()


@pytest.fixture(scope="session")
def registry(settings) -> Registry:
    return Registry(settings.manifests_dir)


@pytest.fixture(scope="session")
def chat_model_dir(settings, registry) -> Path:
    return pull(registry.get(CHAT_MODEL), settings.models_dir, progress=False)


@pytest.fixture(scope="session")
def embed_model_dir(settings, registry) -> Path:
    return pull(registry.get(EMBED_MODEL), settings.models_dir, progress=False)


class ServerProcess:
    def __init__(self, env: dict[str, str], log_path: Path):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.log = open(log_path, "w")
        env = {**os.environ, **env, "FRONTIER_PORT": str(self.port), "FRONTIER_HOST": "127.0.0.1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "service", "serve", "--no-pull-missing"],
                                     cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.base_url}/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"server not ready in {timeout}s: {self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


@pytest.fixture(scope="session")
def server(chat_model_dir, embed_model_dir, tmp_path_factory):
    # fp32 weights: the golden test compares the server's tokens with transformers' own.
    env = {"FRONTIER_DATA_DIR": str(tmp_path_factory.mktemp("data")), "FRONTIER_QUANTIZATION": "none"}
    srv = ServerProcess(env, tmp_path_factory.mktemp("server") / "server.log")
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def chat_tokenizer(chat_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(chat_model_dir)
