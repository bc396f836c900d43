"""Bad input: each ends as exactly one `selfext: error: ...` line on stderr and the documented exit code, with no
traceback and no C abort. Cases that reach llama.cpp's loader with a damaged file, or the Hub, run the installed
command in a subprocess (an abort there could not take pytest down); the rest run in-process."""

from __future__ import annotations

import functools
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional, Union

import pytest
from cliutil import Invoke, Selfext, base_env, one_error_line
from fakehub import FakeHub

DOC = " ".join(["hello world the"] * 150)  # 451 tokens with BOS on the tiny model (trained context 256)


@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]  # {name} refers to the `files` fixture
    code: int
    message: str  # the whole error line after "selfext: error: ", or its start when it ends with "..."
    input: Optional[Union[str, bytes]] = None
    subprocess: bool = False
    env: tuple[tuple[str, str], ...] = ()


CASES = [
    Case("missing-model", ("run", "{missing}", "-p", "hi"), 1, "model file not found: {missing}"),
    Case("model-is-a-directory", ("run", "{dir}", "-p", "hi"), 1, "model path is not a file: {dir}"),
    Case("not-a-gguf", ("run", "{text}", "-p", "hi"), 1, "{text} is not a GGUF model file (no GGUF magic)"),
    Case("empty-model-file", ("run", "{empty}", "-p", "hi"), 1, "{empty} is not a GGUF model file (no GGUF magic)"),
    Case("unknown-gguf-version", ("run", "{version99}", "-p", "hi"), 1,
         "llama.cpp could not read {version99}: this GGUF file is version 99 but this software only supports up to "
         "version 3", subprocess=True),
    Case("corrupt-tensor-count", ("run", "{ntensors}", "-p", "hi"), 1,
         "llama.cpp could not read {ntensors}: number of tensors is 4611686018427387904 but must be in [0, ...",
         subprocess=True),
    Case("corrupt-key-count", ("info", "{nkv}"), 1,
         "llama.cpp could not read {nkv}: number of key value pairs is 4611686018427387904 but must be in [0, ...",
         subprocess=True),
    Case("truncated-header", ("run", "{trunc_head}", "-p", "hi"), 1,
         "llama.cpp could not read {trunc_head}: failed to read key-value pairs", subprocess=True),
    Case("truncated-data", ("run", "{trunc_data}", "-p", "hi"), 1,
         "llama.cpp could not read {trunc_data}: tensor '...", subprocess=True),
    Case("info-truncated", ("info", "{trunc_head}"), 1,
         "llama.cpp could not read {trunc_head}: failed to read key-value pairs", subprocess=True),
    Case("unsupported-architecture", ("run", "{norope}", "--ga-n", "2", "--ga-w", "16", "-p", "hi"), 1,
         "Self-Extend is not available for gpt2 models (the model has no rotary position embedding); "
         "run without --ga-n/--auto", subprocess=True),
    Case("ga-n-zero", ("run", "{tiny}", "--ga-n", "0", "-p", "hi"), 2, "--ga-n must be an integer >= 1, got 0"),
    Case("ga-n-negative", ("run", "{tiny}", "--ga-n", "-3", "-p", "hi"), 2,
         "--ga-n must be an integer >= 1, got -3"),
    Case("ga-w-zero", ("run", "{tiny}", "--ga-n", "2", "--ga-w", "0", "-p", "hi"), 2,
         "--ga-w must be an integer >= 1, got 0"),
    Case("ga-w-not-below-n-ctx-train", ("run", "{tiny}", "--ga-n", "2", "--ga-w", "256", "-p", "hi"), 2,
         "--ga-w 256 must be smaller than the model's trained context (256); try --ga-w 64"),
    Case("beyond-capacity", ("run", "{tiny}", "--ga-n", "2", "--ga-w", "64"), 1,
         "579 tokens exceed the capacity 448 of --ga-n 2 --ga-w 64 on a 256-token model; try --ga-n 4 --ga-w 64",
         input=DOC),
    Case("beyond-trained-context-without-self-extend", ("run", "{tiny}"), 1,
         "579 tokens exceed the model's trained context (256), and Self-Extend is off; try --ga-n 4 --ga-w 64",
         input=DOC),
    Case("auto-impossible", ("run", "{tiny}", "--auto"), 1,
         "7329 tokens are too many for a 256-token model: no group size up to 64 keeps them in the well-trained "
         "window; shorten the text", input=" ".join([DOC] * 16)),
    Case("empty-prompt", ("run", "{tiny}", "-p", ""), 2,
         "the prompt is empty: give some text with -p, -f or on stdin"),
    Case("blank-prompt", ("run", "{tiny}", "-p", "  \n\t"), 2,
         "the prompt is empty: give some text with -p, -f or on stdin"),
    Case("empty-stdin", ("run", "{tiny}"), 2, "the prompt is empty: give some text with -p, -f or on stdin",
         input=""),
    Case("empty-prompt-file", ("run", "{tiny}", "-f", "{empty}"), 2,
         "the prompt is empty: give some text with -p, -f or on stdin"),
    Case("missing-prompt-file", ("run", "{tiny}", "-f", "{missing}"), 1,
         "cannot read prompt file {missing}: No such file or directory"),
    Case("binary-prompt-file", ("run", "{tiny}", "-f", "{latin1}"), 1,
         "the prompt in {latin1} is not UTF-8 text (byte 3)"),
    Case("binary-stdin", ("run", "{tiny}"), 1, "the prompt in stdin is not UTF-8 text (byte 3)",
         input=b"caf\xe9 au lait"),
    Case("prompt-file-is-a-directory", ("run", "{tiny}", "-f", "{dir}"), 1,
         "cannot read prompt file {dir}: Is a directory"),
    Case("prompt-and-file", ("run", "{tiny}", "-p", "hi", "-f", "{text}"), 2,
         "give the prompt with -p or with -f, not both"),
    Case("context-smaller-than-prompt", ("run", "{tiny}", "-p", "hello world", "-c", "2"), 2,
         "the prompt has 3 tokens, --ctx-size 2 holds fewer: raise it to at least 4, or leave it out"),
    Case("auto-with-ga-n", ("run", "{tiny}", "--auto", "--ga-n", "2", "-p", "hi"), 2,
         "--auto chooses G and W itself: give either --auto or --ga-n/--ga-w, not both"),
    Case("auto-with-ga-w", ("run", "{tiny}", "--auto", "--ga-w", "32", "-p", "hi"), 2,
         "--auto chooses G and W itself: give either --auto or --ga-n/--ga-w, not both"),
    Case("chat-without-template", ("run", "{tiny}", "--chat", "-p", "hi"), 2,
         "tiny-llama.gguf has no chat template: drop --chat/--system"),
    Case("system-with-no-chat", ("run", "{tiny}", "--no-chat", "--system", "x", "-p", "hi"), 2,
         "--system needs the chat template: drop --no-chat"),
    Case("n-predict-zero", ("run", "{tiny}", "-n", "0", "-p", "hi"), 2, "--n-predict must be >= 1, got 0"),
    Case("negative-temp", ("run", "{tiny}", "--temp", "-1", "-p", "hi"), 2,
         "--temp must be >= 0 (0 = greedy), got -1.0"),
    Case("top-p-zero", ("run", "{tiny}", "--top-p", "0", "-p", "hi"), 2, "--top-p must be in (0, 1], got 0.0"),
    Case("not-a-number", ("run", "{tiny}", "--temp", "warm", "-p", "hi"), 2,
         "Invalid value for '--temp': Input should be a valid number, unable to parse string as a number (see "
         "'selfext run --help')"),
    Case("negative-ctx-size", ("run", "{tiny}", "-c", "-1", "-p", "hi"), 2,
         "Invalid value for '--ctx-size' / '-c': Input should be greater than or equal to 0 (see "
         "'selfext run --help')"),
    Case("unknown-option", ("info", "{tiny}", "--gpu"), 2, "No such option: --gpu (see 'selfext info --help')"),
    Case("missing-reference", ("pull",), 2, "Missing argument 'REF' (see 'selfext pull --help')"),
    Case("unknown-command", ("runn",), 2, "No such command 'runn'..."),
    Case("invalid-hf-reference", ("run", "owner/repo:", "-p", "hi"), 2,
         "invalid Hugging Face reference 'owner/repo:': use owner/repo/file.gguf or owner/repo:QUANT"),
    Case("invalid-hf-file", ("pull", "owner/repo/weights.bin"), 2,
         "invalid Hugging Face reference 'owner/repo/weights.bin': the file must be a .gguf path inside the repo; "
         "use owner/repo/file.gguf or owner/repo:QUANT"),
    Case("invalid-hf-name", ("pull", "own er/repo:Q4_0"), 2,
         "invalid Hugging Face reference 'own er/repo:Q4_0': use owner/repo/file.gguf or owner/repo:QUANT"),
    Case("hub-repo-not-found", ("run", "someone/missing:Q4_0", "-p", "hi"), 1,
         "no repository someone/missing on the Hugging Face Hub (if it is private, log in with hf auth login or "
         "set HF_TOKEN)", subprocess=True, env=(("HF_ENDPOINT", "{hub}"),)),
    Case("hub-file-404", ("pull", "someone/tiny/missing.gguf"), 1,
         "someone/tiny has no file missing.gguf (HTTP 404)", subprocess=True, env=(("HF_ENDPOINT", "{hub}"),)),
    Case("run-hub-file-404", ("run", "someone/tiny/missing.gguf", "-p", "hi"), 1,
         "no local file 'someone/tiny/missing.gguf' and someone/tiny has no file missing.gguf (HTTP 404)",
         subprocess=True, env=(("HF_ENDPOINT", "{hub}"),)),
    Case("hub-http-403", ("pull", "someone/tiny/locked-Q4_0.gguf"), 1,
         "the Hugging Face Hub answered HTTP 403 for someone/tiny/locked-Q4_0.gguf, and it is not cached; check the "
         "token (HF_TOKEN) or try again later", subprocess=True, env=(("HF_ENDPOINT", "{hub}"),)),
    Case("endpoint-not-a-hub", ("pull", "someone/tiny/tiny-Q8_0.gguf"), 1,
         "{web} does not answer like the Hugging Face Hub (no X-Repo-Commit/ETag); check HF_ENDPOINT",
         subprocess=True, env=(("HF_ENDPOINT", "{web}"),)),
    pytest.param(Case("hub-unreachable", ("pull", "someone/tiny/tiny-Q8_0.gguf"), 1,
                      "could not reach the Hugging Face Hub (http://127.0.0.1:9) and someone/tiny/tiny-Q8_0.gguf is "
                      "not cached: check the connection...", subprocess=True),
                 marks=pytest.mark.slow, id="hub-unreachable"),  # huggingface_hub retries for ~23 s first
    Case("hub-offline-not-cached", ("run", "someone/tiny/tiny-Q8_0.gguf", "-p", "hi"), 1,
         "someone/tiny/tiny-Q8_0.gguf is not in the Hugging Face cache (...",
         subprocess=True, env=(("HF_ENDPOINT", "{hub}"), ("HF_HUB_OFFLINE", "1"))),
    Case("unwritable-cache", ("pull", "someone/tiny:Q8_0"), 1,
         "cannot write the Hugging Face cache {text}: Not a directory; set HF_HOME to a writable folder",
         subprocess=True, env=(("HF_ENDPOINT", "{hub}"), ("HF_HUB_CACHE", "{text}"))),
    Case("unwritable-hf-home", ("pull", "someone/tiny:Q8_0"), 1,
         "cannot write the Hugging Face cache {text}: Not a directory; set HF_HOME to a writable folder",
         subprocess=True, env=(("HF_ENDPOINT", "{hub}"), ("HF_HOME", "{text}"))),
]


@contextmanager
def plain_web_server(root: Path) -> Iterator[str]:
    """An ordinary static web server (no Hub headers): what a mistyped HF_ENDPOINT might point at."""
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(root))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def stack() -> Iterator[ExitStack]:
    with ExitStack() as s:
        yield s


@pytest.fixture
def files(tmp_path: Path, tiny_model: Path, norope_model: Path, fake_hub: FakeHub,
          stack: ExitStack) -> dict[str, str]:
    data = tiny_model.read_bytes()
    huge = (1 << 62).to_bytes(8, "little")  # GGUF header: magic, version (u32), n_tensors (u64), n_kv (u64)
    made = {"trunc_head": data[:100], "trunc_data": data[: len(data) // 2 + 100000], "text": b"hello\n",
            "empty": b"", "latin1": b"caf\xe9 au lait", "version99": data[:4] + (99).to_bytes(4, "little") + data[8:],
            "ntensors": data[:8] + huge + data[16:], "nkv": data[:16] + huge + data[24:]}
    for name, content in made.items():
        (tmp_path / name).write_bytes(content)
    fake_hub.add("someone/tiny", "tiny-Q8_0.gguf", data)
    fake_hub.add("someone/tiny", "locked-Q4_0.gguf", data)
    fake_hub.status["locked-Q4_0.gguf"] = 403
    served = tmp_path / "web" / "someone/tiny/resolve/main/tiny-Q8_0.gguf"  # where the Hub would have it
    served.parent.mkdir(parents=True)
    served.write_bytes(b"GGUF")
    web = stack.enter_context(plain_web_server(tmp_path / "web"))
    return {**{name: str(tmp_path / name) for name in made}, "tiny": str(tiny_model), "norope": str(norope_model),
            "missing": str(tmp_path / "nope.gguf"), "dir": str(tmp_path), "hub": fake_hub.url, "web": web}


@pytest.mark.parametrize("case", CASES, ids=[c.id if isinstance(c, Case) else None for c in CASES])
def test_bad_input_is_one_error_line_and_an_exit_code(case: Case, files: dict[str, str], cli: Invoke,
                                                      selfext: Selfext) -> None:
    argv = [a.format(**files) for a in case.argv]
    if case.subprocess:
        proc = selfext(*argv, input=case.input, env={k: v.format(**files) for k, v in case.env})
        code, stderr, stdout = proc.returncode, proc.stderr, proc.stdout
    else:
        result = cli(*argv, input=case.input)
        code, stderr, stdout = result.exit_code, result.stderr, result.stdout
    line = one_error_line(stderr)
    want = "selfext: error: " + case.message.format(**files)
    if want.endswith("..."):
        assert line.startswith(want[:-3]), line
    else:
        assert line == want
    assert code == case.code
    assert stdout == ""


def test_debug_shows_the_traceback(selfext: Selfext, tmp_path: Path) -> None:
    proc = selfext("run", tmp_path / "nope.gguf", "-p", "hi", env={"SELFEXT_DEBUG": "1"})
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "ModelError" in proc.stderr


@pytest.mark.parametrize(("args", "message"), [
    ((), "no prompt: give -p TEXT or -f FILE, or pipe text in"),
    (("-f", "-"), "stdin is closed: give the prompt with -p TEXT or -f FILE"),
], ids=["no-prompt", "file-dash"])
def test_a_closed_stdin_is_a_usage_error(tiny_model: Path, tmp_path: Path, args: tuple[str, ...],
                                         message: str) -> None:
    exe = shutil.which("selfext")
    cmd = [exe] if exe else [sys.executable, "-c", "from selfext_cpp.cli.app import main; main()"]
    proc = subprocess.run(["sh", "-c", 'exec "$@" <&-', "sh", *cmd, "run", str(tiny_model), *args],
                          capture_output=True, text=True, env=base_env(HF_HOME=str(tmp_path)), timeout=120)
    assert (proc.returncode, proc.stdout) == (2, "")
    assert one_error_line(proc.stderr) == f"selfext: error: {message}"
