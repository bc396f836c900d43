"""`selfext pull` (and `run` with a Hub reference) end to end against a local server playing the Hub."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from cliutil import Selfext, base_env, one_error_line
from fakehub import FakeHub

FAULTS = Path(__file__).with_name("faults.py")

REPO = "someone/tiny-GGUF"


@pytest.fixture
def hub(fake_hub: FakeHub, tiny_model: Path) -> FakeHub:
    data = tiny_model.read_bytes()
    fake_hub.add(REPO, "tiny-Q8_0.gguf", data)
    fake_hub.add(REPO, "tiny-Q4_K_M.gguf", data[:1000])  # never downloaded in these tests
    fake_hub.add(REPO, "split/tiny-Q4_0-00002-of-00002.gguf", b"second shard")
    fake_hub.add(REPO, "split/tiny-Q4_0-00001-of-00002.gguf", b"GGUF first shard")
    fake_hub.add(REPO, "mmproj-tiny-Q8_0.gguf", b"vision projector")
    fake_hub.add(REPO, "README.md", b"# tiny\n")
    return fake_hub


@pytest.fixture
def hf_home(tmp_path: Path) -> Path:
    return tmp_path / "hf-home"  # the `selfext` fixture's HF_HOME



def test_pull_file_reference_prints_the_cached_path(selfext: Selfext, hub: FakeHub, hf_home: Path,
                                                    tiny_model: Path) -> None:
    proc = selfext("pull", f"{REPO}/tiny-Q8_0.gguf", env={"HF_ENDPOINT": hub.url})
    assert proc.returncode == 0, proc.stderr
    path = Path(proc.stdout.strip())
    assert proc.stdout == f"{path}\n" and proc.stderr == ""
    assert path.parent.parent == hf_home / "hub" / "models--someone--tiny-GGUF" / "snapshots"
    assert path.read_bytes() == tiny_model.read_bytes()


def test_pull_quant_selects_the_labelled_file(selfext: Selfext, hub: FakeHub, tiny_model: Path) -> None:
    proc = selfext("pull", f"{REPO}:q8_0", "--json", env={"HF_ENDPOINT": hub.url})
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout)
    assert (d["ref"], d["repo_id"], Path(d["path"]).name) == (f"{REPO}:q8_0", REPO, "tiny-Q8_0.gguf")
    assert Path(d["path"]).read_bytes() == tiny_model.read_bytes()
    assert [r.path for r in hub.requests if r.path.startswith("/api/")] == [
        f"/api/models/{REPO}/tree/main?recursive=true&expand=false"]


def test_pull_quant_of_a_split_model_gets_every_shard(selfext: Selfext, hub: FakeHub) -> None:
    proc = selfext("pull", f"{REPO}:Q4_0", "--json", env={"HF_ENDPOINT": hub.url})
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout)
    assert [Path(f).name for f in d["files"]] == ["tiny-Q4_0-00001-of-00002.gguf", "tiny-Q4_0-00002-of-00002.gguf"]
    assert d["path"] == d["files"][0]
    assert Path(d["files"][1]).read_bytes() == b"second shard"


def test_pull_repo_with_several_ggufs_asks_for_a_quant(selfext: Selfext, hub: FakeHub) -> None:
    proc = selfext("pull", REPO, env={"HF_ENDPOINT": hub.url})
    assert proc.returncode == 1
    assert one_error_line(proc.stderr) == (
        f"selfext: error: {REPO} matches 3 GGUF files (split/tiny-Q4_0-00001-of-00002.gguf, tiny-Q4_K_M.gguf, "
        f"tiny-Q8_0.gguf): name one as {REPO}/FILE or pick a quant as owner/repo:QUANT")


def test_pull_unknown_quant_lists_the_ones_there(selfext: Selfext, hub: FakeHub) -> None:
    proc = selfext("pull", f"{REPO}:Q5_K_S", env={"HF_ENDPOINT": hub.url})
    assert proc.returncode == 1
    assert one_error_line(proc.stderr) == (
        f"selfext: error: {REPO} has no GGUF file labelled Q5_K_S (quants there: Q4_0, Q4_K_M, Q8_0); use "
        "owner/repo/file.gguf or owner/repo:QUANT")


def test_pull_404_is_one_line_and_exit_1(selfext: Selfext, hub: FakeHub) -> None:
    proc = selfext("pull", f"{REPO}/nope-Q8_0.gguf", env={"HF_ENDPOINT": hub.url})
    assert (proc.returncode, proc.stdout) == (1, "")
    assert one_error_line(proc.stderr) == f"selfext: error: {REPO} has no file nope-Q8_0.gguf (HTTP 404)"
    proc = selfext("pull", "someone/absent:Q8_0", env={"HF_ENDPOINT": hub.url})
    assert proc.returncode == 1 and "no repository someone/absent" in one_error_line(proc.stderr)


@pytest.fixture(scope="module")
def big() -> bytes:
    """24 MiB: huggingface_hub writes 10 MiB chunks, so a cut at 15 MiB leaves one chunk on disk to resume from."""
    return b"GGUF" + np.random.default_rng(0).integers(0, 256, 24 << 20, dtype=np.uint8).tobytes()


def test_a_connection_dropped_mid_body_resumes_with_a_range_request(selfext: Selfext, hub: FakeHub,
                                                                    big: bytes) -> None:
    hub.add(REPO, "big-Q8_0.gguf", big)
    hub.plan["big-Q8_0.gguf"] = [("drop", 15 << 20)]
    proc = selfext("pull", f"{REPO}/big-Q8_0.gguf", env={"HF_ENDPOINT": hub.url})
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()).read_bytes() == big
    first, second = (r.headers.get("Range") for r in hub.gets("big-Q8_0.gguf"))
    assert first is None
    assert second is not None and 0 < int(second.removeprefix("bytes=").rstrip("-")) <= 15 << 20


def test_a_failed_download_leaves_no_partial_file_in_the_cache(selfext: Selfext, hub: FakeHub, hf_home: Path,
                                                               big: bytes) -> None:
    hub.add(REPO, "big-Q8_0.gguf", big)
    hub.plan["big-Q8_0.gguf"] = [("drop", 15 << 20), ("status", 500)]  # and the resume attempt fails
    ref, env = f"{REPO}/big-Q8_0.gguf", {"HF_ENDPOINT": hub.url}
    proc = selfext("pull", ref, env=env)
    assert (proc.returncode, proc.stdout) == (1, "")
    assert one_error_line(proc.stderr) == (f"selfext: error: the Hugging Face Hub answered HTTP 500 for {ref}: "
                                           "check the token (HF_TOKEN) or try again later")
    repo_dir = hf_home / "hub" / "models--someone--tiny-GGUF"
    left = sorted(p.relative_to(repo_dir).as_posix() for p in repo_dir.rglob("*") if p.is_file())
    assert left == ["refs/main"]  # no blob, no snapshot link, no .incomplete

    proc = selfext("pull", ref, env=env)
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()).read_bytes() == big


def cache_files(hf_home: Path) -> list[str]:
    repo_dir = hf_home / "hub" / "models--someone--tiny-GGUF"
    return sorted(p.relative_to(repo_dir).as_posix() for p in repo_dir.rglob("*") if p.is_file())


def with_fault(fault: str, *args: str, hf_home: Path, hub: FakeHub) -> subprocess.CompletedProcess[str]:
    """`selfext ARGS` in a subprocess with one of faults.py's faults."""
    return subprocess.run([sys.executable, str(FAULTS), fault, *args], capture_output=True, text=True, timeout=120,
                          env=base_env(HF_HOME=str(hf_home), HF_ENDPOINT=hub.url))


def test_a_disk_that_fills_up_mid_download_is_one_line_and_leaves_no_partial_file(hub: FakeHub, hf_home: Path,
                                                                                  big: bytes) -> None:
    hub.add(REPO, "big-Q8_0.gguf", big)
    ref = f"{REPO}/big-Q8_0.gguf"
    proc = with_fault("disk-full", "pull", ref, hf_home=hf_home, hub=hub)
    assert (proc.returncode, proc.stdout) == (1, "")
    assert one_error_line(proc.stderr) == (
        f"selfext: error: the disk of the Hugging Face cache {hf_home / 'hub'} filled up while downloading {ref} "
        "(No space left on device): free some space, or set HF_HOME to a folder on a larger disk")
    assert cache_files(hf_home) == ["refs/main"]


def test_a_disk_without_room_for_the_file_stops_before_downloading(hub: FakeHub, hf_home: Path,
                                                                   big: bytes) -> None:
    hub.add(REPO, "big-Q8_0.gguf", big)
    ref = f"{REPO}/big-Q8_0.gguf"
    proc = with_fault("no-free-space", "pull", ref, hf_home=hf_home, hub=hub)
    assert (proc.returncode, proc.stdout) == (1, "")
    blobs = hf_home / "hub" / "models--someone--tiny-GGUF" / "blobs"
    assert one_error_line(proc.stderr) == (
        f"selfext: error: not enough disk space for {ref}: it takes {len(big) / 1e6:.2f} MB and {blobs} has "
        "0.00 MB free; free some space, or set HF_HOME to a folder on a larger disk")
    assert cache_files(hf_home) == ["refs/main"]
    assert hub.gets("big-Q8_0.gguf") == []


def test_ctrl_c_during_a_download_exits_130_and_leaves_no_partial_file(hub: FakeHub, hf_home: Path,
                                                                      big: bytes) -> None:
    hub.add(REPO, "big-Q8_0.gguf", big)
    hub.plan["big-Q8_0.gguf"] = [("stall", 12 << 20)] * 8  # a chunk on disk, then the connection hangs (retries too)
    env = base_env(HF_HOME=str(hf_home), HF_ENDPOINT=hub.url, HF_HUB_DOWNLOAD_TIMEOUT="60")
    # SIGINT as on a terminal, even when the tests run in the background (where it is inherited ignored)
    boot = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
            "sys.argv[0] = 'selfext'; from selfext_cpp.cli.app import main; main()")
    proc = subprocess.Popen([sys.executable, "-c", boot, "pull", f"{REPO}/big-Q8_0.gguf"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        blobs = hf_home / "hub" / "models--someone--tiny-GGUF" / "blobs"
        deadline = time.monotonic() + 120
        while not (hub.gets("big-Q8_0.gguf") and list(blobs.glob("*.incomplete"))):  # body under way, file open
            assert time.monotonic() < deadline and proc.poll() is None, "the download never started"
            time.sleep(0.05)
        time.sleep(0.5)  # let a chunk reach the file
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert (proc.returncode, out, err) == (130, "", "selfext: interrupted\n")
    assert cache_files(hf_home) == ["refs/main"]


def test_offline_mode_uses_the_cache_without_a_request(selfext: Selfext, hub: FakeHub) -> None:
    env = {"HF_ENDPOINT": hub.url}
    first = selfext("pull", f"{REPO}:Q8_0", env=env)
    assert first.returncode == 0, first.stderr
    n_requests = len(hub.requests)
    for ref in (f"{REPO}:Q8_0", f"{REPO}/tiny-Q8_0.gguf"):
        proc = selfext("pull", ref, env={**env, "HF_HUB_OFFLINE": "1"})
        assert (proc.returncode, proc.stdout, proc.stderr) == (0, first.stdout, "")
    assert len(hub.requests) == n_requests


def test_the_token_is_sent(selfext: Selfext, hub: FakeHub) -> None:
    proc = selfext("pull", f"{REPO}/tiny-Q8_0.gguf", env={"HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_fake_token"})
    assert proc.returncode == 0, proc.stderr
    assert {r.headers.get("authorization") for r in hub.requests} == {"Bearer hf_fake_token"}


def test_run_downloads_a_hub_reference_then_uses_the_cache(selfext: Selfext, hub: FakeHub) -> None:
    args = ("run", f"{REPO}:Q8_0", "-p", "hello world", "-n", "3", "--temp", "0", "--json")
    first = selfext(*args, env={"HF_ENDPOINT": hub.url})
    assert first.returncode == 0, first.stderr
    d = json.loads(first.stdout)
    assert (Path(d["model"]).name, d["prompt_tokens"], d["generated_tokens"]) == ("tiny-Q8_0.gguf", 3, 3)
    second = selfext(*args, env={"HF_ENDPOINT": hub.url})
    assert json.loads(second.stdout)["text"] == d["text"]
    assert len(hub.gets("tiny-Q8_0.gguf")) == 1  # the second run found it in the cache


@pytest.mark.parametrize(("spec", "want"), [
    ("owner/repo/file.gguf", ("owner/repo", "file.gguf", None)),
    ("owner/repo/sub/dir/file.Q4_K_M.gguf", ("owner/repo", "sub/dir/file.Q4_K_M.gguf", None)),
    ("owner/repo:Q4_K_M", ("owner/repo", None, "Q4_K_M")),
    ("Owner-1/repo.name_x:q8_0", ("Owner-1/repo.name_x", None, "q8_0")),
    ("owner/repo", ("owner/repo", None, None)),
    ("model.gguf", "local"),  # no slash
    ("models/model.gguf", "local"),  # one slash and a .gguf name: a relative path
    ("./owner/repo", "local"),
    ("/abs/owner/repo/file.gguf", "local"),
])
def test_model_argument_is_a_local_path_or_a_hub_reference(spec: str, want: object) -> None:
    from selfext_cpp.hub import looks_like_ref, parse_ref

    if want == "local":
        assert not looks_like_ref(spec)
    else:
        ref = parse_ref(spec)
        assert looks_like_ref(spec) and (ref.repo_id, ref.filename, ref.quant) == want
