"""`selfext run` in real shell pipelines: JSON that parses, and a reader that hangs up early."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cliutil import base_env

SELFEXT = shutil.which("selfext")
pytestmark = pytest.mark.skipif(SELFEXT is None or shutil.which("bash") is None,
                                reason="needs the installed selfext command and bash")


def sh(script: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-c", f"set -o pipefail; {script}"], capture_output=True, text=True,
                          env=base_env(HF_HOME=str(tmp_path / "hf")), cwd=tmp_path, timeout=120)


def test_cat_doc_into_run_json_parses(tmp_path: Path, tiny_model: Path) -> None:
    (tmp_path / "doc.txt").write_text(" ".join(["hello world the"] * 150))  # 451 tokens > 256 trained
    py = shlex.quote(sys.executable)
    proc = sh(f"cat doc.txt | selfext run {tiny_model} --ga-n 4 --ga-w 64 --json "
              f"| {py} -c 'import json,sys; json.load(sys.stdin)'", tmp_path)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")
    proc = sh(f"cat doc.txt | selfext run {tiny_model} --ga-n 4 --ga-w 64 -n 5 --json", tmp_path)
    d = json.loads(proc.stdout)
    assert (d["prompt_tokens"], d["ga_n"], d["ga_w"], d["self_extend"]) == (451, 4, 64, True)


def test_a_reader_that_stops_early_ends_the_run_quietly(tmp_path: Path, tiny_model: Path) -> None:
    proc = sh(f"selfext run {tiny_model} -p 'hello world' -n 240 --temp 0 | head -c 1 >/dev/null",
              tmp_path)
    assert proc.returncode == 0 and proc.stderr == ""


def test_a_terminal_on_stderr_gets_the_progress_bar_and_logs_but_not_llama_cpp(tmp_path: Path,
                                                                                tiny_model: Path) -> None:
    import os
    import pty

    master, terminal = pty.openpty()
    args = [SELFEXT, "run", str(tiny_model), "-p", "hello world", "-n", "3", "--temp", "0"]
    proc = subprocess.run(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=terminal,
                          env=base_env(HF_HOME=str(tmp_path / "hf"), TERM="xterm"), timeout=120)
    os.close(terminal)
    err = b""
    while True:
        try:
            chunk = os.read(master, 1 << 16)
        except OSError:  # EIO: the terminal's other end is closed and drained
            break
        if not chunk:
            break
        err += chunk
    os.close(master)
    assert proc.returncode == 0
    assert b"prefill" in err and b"tok/s" in err  # the (transient) bar
    assert b"selfext: loaded tiny-llama.gguf" in err and b"selfext: prompt 3 tokens in" in err
    assert b"llama_model_loader" not in err and b"print_info" not in err  # llama.cpp's log needs -v
    greedy = sh(f"selfext run {tiny_model} -p 'hello world' -n 3 --temp 0 --json", tmp_path)
    assert proc.stdout.decode() == json.loads(greedy.stdout)["text"]  # stdout: the text only
