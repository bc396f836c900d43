"""RPC test helpers on 127.0.0.1: `selfext rpc-server` processes, fake servers, and a proxy that cuts the line."""

from __future__ import annotations

import collections
import os
import signal
import socket
import struct
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from live_server import SELFEXT

STARTUP_TIMEOUT = 30.0  # seconds until a server listens (the machine is shared)
RPC_CMD_SET_TENSOR, RPC_CMD_SET_TENSOR_HASH = 6, 7
RPC_CMD_GRAPH_COMPUTE, RPC_CMD_HELLO, RPC_CMD_GRAPH_RECOMPUTE = 10, 14, 16
HELLO_REQUEST = 24  # bytes: the client's connection capabilities
OUR_PROTOCOL = (110, 0, 0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen[bytes] | None = None, log: Path | None = None) -> None:
    """Until something accepts on 127.0.0.1:port (a connection closed unused: the server takes the next)."""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}: {log.read_text() if log else ''}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {STARTUP_TIMEOUT:.0f} s")


@dataclass
class RpcServer:
    """`selfext rpc-server` on 127.0.0.1 in a subprocess (its stderr in ``log``)."""

    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)


def start_rpc_server(log_dir: Path, *args: str, threads: int = 2) -> RpcServer:
    port = free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"rpc-server-{port}.log"
    with log_path.open("wb") as err:
        proc = subprocess.Popen([*SELFEXT, "rpc-server", "--port", str(port), "-t", str(threads), *args],
                                stdout=subprocess.DEVNULL, stderr=err)
    server = RpcServer(proc, port, log_path)
    try:
        wait_listening(port, proc, log_path)
    except BaseException:
        server.kill()
        raise
    return server


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        try:
            chunk = sock.recv(n - len(data))
        except OSError:
            return None
        if not chunk:
            return None
        data += chunk
    return data


@dataclass
class FakeServer:
    """Accepts on 127.0.0.1 and answers the hello with ``version`` (major, minor, patch), or never (None)."""

    version: tuple[int, int, int] | None
    listener: socket.socket = field(default_factory=lambda: socket.create_server(("127.0.0.1", 0)))
    conns: list[socket.socket] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.endpoint = f"127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.conns.append(conn)
            head = _recv_exact(conn, 9 + HELLO_REQUEST)  # | cmd | size (8) | caps |
            if head is None or self.version is None:
                continue  # silent: hold the connection open
            conn.sendall(struct.pack("<Q", 4 + HELLO_REQUEST) + bytes([*self.version, 0]) + bytes(HELLO_REQUEST))

    def close(self) -> None:
        self.listener.close()
        for c in self.conns:
            c.close()


class CutProxy:
    """A TCP proxy to an RPC server that ends both sides of the connection right after forwarding the
    client's ``cut_after``-th graph computation, or when :meth:`cut` is called: the server, as the client sees
    it, is lost at that point of the run. ``commands`` counts the client's commands by type."""

    def __init__(self, target_port: int, cut_after: int | None = None) -> None:
        self.target_port = target_port
        self.cut_after = cut_after
        self.graphs = 0
        self.commands: collections.Counter[int] = collections.Counter()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            self._sockets += [client, server]
            threading.Thread(target=self._answers, args=(server, client), daemon=True).start()
            threading.Thread(target=self._commands, args=(client, server), daemon=True).start()

    def _answers(self, src: socket.socket, dst: socket.socket) -> None:
        while data := self._recv(src):
            try:
                dst.sendall(data)
            except OSError:
                break
        self._close(src, dst)

    def _commands(self, src: socket.socket, dst: socket.socket) -> None:
        while (head := _recv_exact(src, 9)) is not None:  # | cmd (1 byte) | size (8 bytes) | payload |
            payload = _recv_exact(src, struct.unpack("<Q", head[1:])[0])
            if payload is None:
                break
            try:
                dst.sendall(head + payload)
            except OSError:
                break
            self.commands[head[0]] += 1
            if head[0] in (RPC_CMD_GRAPH_COMPUTE, RPC_CMD_GRAPH_RECOMPUTE):
                self.graphs += 1
                if self.cut_after is not None and self.graphs >= self.cut_after:
                    self.cut()
                    return
        self._close(src, dst)  # one side left: so does the other (the server serves one client at a time)

    @staticmethod
    def _close(*socks: socket.socket) -> None:
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    @staticmethod
    def _recv(sock: socket.socket) -> bytes:
        try:
            return sock.recv(1 << 16)
        except OSError:
            return b""

    def cut(self) -> None:
        self._close(*self._sockets)

    def close(self) -> None:
        self.listener.close()
        self.cut()


def selfext_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "SELFEXT_DEBUG"}
    env.update(extra)
    return env
