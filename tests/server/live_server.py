"""`selfext serve` in a subprocess on 127.0.0.1, and ways to talk to it: the openai client and raw HTTP."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

# the installed `selfext` command (next to this Python); `python -m selfext_cpp` would import a source checkout
# in the working directory instead of the installed package
_SCRIPT = Path(sys.executable).with_name("selfext")
SELFEXT = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "selfext_cpp"]
STARTUP_TIMEOUT = 60.0  # seconds; a tiny model starts in ~2 s, but the machine is shared
REQUEST_TIMEOUT = 30.0
READY = re.compile(r"^selfext: serving .* at (http://\S+)/v1 ", re.MULTILINE)

# the tiny test model: trained on 64 tokens, Self-Extend G=4 W=16 reaches (64 - 16) * 4 + 16 = 208
N_CTX_TRAIN = 64
GA_N, GA_W = 4, 16
CAPACITY = 208
SELF_EXTEND_ARGS = ["--ga-n", str(GA_N), "--ga-w", str(GA_W), "--chat-format", "chatml", "-t", "2"]


def words(n: int, start: int = 0) -> str:
    """``n`` words that the tiny model's vocabulary holds whole: with BOS, a prompt of n + 1 tokens."""
    return " ".join(f"w{i}" for i in range(start, start + n))


@dataclass
class LiveServer:
    proc: subprocess.Popen[bytes]
    url: str  # http://127.0.0.1:PORT
    log_path: Path  # its stderr
    out_path: Path  # its stdout

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def client(self, api_key: str = "none") -> Any:
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=REQUEST_TIMEOUT)

    def http(self, method: str, path: str, body: Any = None, *, raw: bytes | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        """(status, headers, body bytes) of one plain HTTP request (JSON ``body``, or ``raw`` bytes)."""
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as err:
            return err.code, dict(err.headers), err.read()

    def json(self, method: str, path: str, body: Any = None, **kw: Any) -> tuple[int, Any]:
        status, _, data = self.http(method, path, body, **kw)
        return status, json.loads(data)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


StartServer = Callable[..., LiveServer]  # the start_server fixture: start_server(*args, env=None)


def start(model: Path, *args: str, log_dir: Path, env: dict[str, str] | None = None) -> LiveServer:
    """Start ``selfext serve MODEL ARGS --port 0`` and wait (bounded) until /health answers."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path, out_path = log_dir / "stderr.log", log_dir / "stdout.log"
    with log_path.open("wb") as err, out_path.open("wb") as out:
        proc = subprocess.Popen([*SELFEXT, "serve", str(model), *args, "--host", "127.0.0.1", "--port", "0"],
                                stdout=out, stderr=err, env=env)
    server = LiveServer(proc, "", log_path, out_path)
    deadline = time.monotonic() + STARTUP_TIMEOUT
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"selfext serve exited with {proc.returncode}:\n{server.log()}")
            ready = READY.search(server.log())
            if ready:
                server.url = ready.group(1)
                try:
                    if server.http("GET", "/health")[0] == 200:
                        return server
                except OSError:
                    pass  # not listening yet
            time.sleep(0.05)
        raise RuntimeError(f"selfext serve was not ready in {STARTUP_TIMEOUT:.0f} s:\n{server.log()}")
    except BaseException:
        server.stop()
        raise
