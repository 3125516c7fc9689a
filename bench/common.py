"""Helpers shared by the benchmarks: a server subprocess, result files."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m service serve` on a free loopback port with extra FRONTIER_* settings; or, with
    cmd, any OpenAI-compatible server whose command line takes the port ({port} in cmd)."""

    def __init__(self, env: dict[str, str] | None = None, log_name: str = "server", cmd: list[str] | None = None,
                 ready_path: str = "/ready"):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.ready_path = ready_path
        RESULTS.mkdir(parents=True, exist_ok=True)
        self.log = open(RESULTS / f".{log_name}.log", "w")
        full_env = {**os.environ, **(env or {}), "FRONTIER_PORT": str(self.port), "FRONTIER_HOST": "127.0.0.1"}
        cmd = [c.format(port=self.port) for c in cmd] if cmd else [sys.executable, "-m", "service", "serve"]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=self.log, stderr=subprocess.STDOUT)

    def __enter__(self) -> "Server":
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early; see {self.log.name}")
            try:
                if httpx.get(f"{self.base_url}{self.ready_path}", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError("server not ready in 300 s")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def machine() -> dict:
    """CPU model, flags that decide kernels (avx2, avx512*, vnni, amx), cores, torch, ISA env."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from service.modeling.cpu_info import cpu_summary

    return cpu_summary()


def machine_line() -> str:
    m = machine()
    env = ", ".join(f"{k}={v}" for k, v in m["isa_env"].items()) or "none"
    return (f"Machine: {m['cpu']}, {m['cores']} cores, flags {' '.join(m['flags']) or '-'}, torch {m['torch']} "
            f"(ATen {m['aten_capability']}), ISA env: {env}, int8 kernel saturates: {m['int8_kernel_saturates']}.")


def write_markdown(name: str, title: str, header: list[str], rows: list[list], notes: str = "") -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    lines = [f"# {title}", "", machine_line(), "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    if notes:
        lines += ["", notes]
    path = RESULTS / f"{name}.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def print_json(record: dict) -> None:
    print(json.dumps({**record, "machine": machine()}, sort_keys=True))
