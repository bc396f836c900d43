"""Bad input to the Python API: each raises one SelfextError subclass (a one-line message, no C abort) before
anything slow. Messages are checked by their stable words only: the library names its parameters (ga_n, ga_w)
where the CLI names flags. Damaged files that reach llama.cpp's loader are opened in a subprocess."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from tinymodel import make_tiny_gguf

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cli"))
from cliutil import make_gpt2_gguf  # noqa: E402

L = 256  # n_ctx_train of the tiny model


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("api")
    tiny, gpt2 = root / "tiny.gguf", root / "gpt2.gguf"
    make_tiny_gguf(tiny, n_ctx_train=L)
    make_gpt2_gguf(gpt2)
    data = tiny.read_bytes()
    made = {"text": b"hello\n", "empty": b"", "trunc_head": data[:100],
            "nkv": data[:16] + (1 << 62).to_bytes(8, "little") + data[24:]}
    for name, content in made.items():
        (root / name).write_bytes(content)
    return {"tiny": tiny, "gpt2": gpt2, "missing": root / "nope.gguf", "dir": root,
            **{name: root / name for name in made}}


@pytest.mark.parametrize(("name", "error", "words"), [
    ("missing", "ModelError", "not found"),
    ("dir", "ModelError", "not a file"),
    ("text", "ModelError", "not a GGUF"),
    ("empty", "ModelError", "not a GGUF"),
])
def test_load_refuses_what_is_not_a_gguf_before_llama_cpp(files: dict[str, Path], name: str, error: str,
                                                          words: str) -> None:
    import selfext_cpp

    with pytest.raises(getattr(selfext_cpp, error)) as err:
        selfext_cpp.load(files[name])
    assert words in str(err.value) and str(files[name]) in str(err.value)


def raised_in_subprocess(call: str) -> str:
    """``call`` in a fresh interpreter; the name of the exception it raised and its message."""
    code = ("import selfext_cpp\n"
            f"try:\n    {call}\nexcept Exception as exc:\n    print(type(exc).__name__, exc, sep=': ')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


@pytest.mark.parametrize(("name", "call"), [
    ("trunc_head", "selfext_cpp.load({path!r})"),
    ("nkv", "selfext_cpp.load({path!r})"),
    ("nkv", "__import__('selfext_cpp.models').models.inspect({path!r})"),
], ids=["truncated-load", "corrupt-load", "corrupt-inspect"])
def test_a_damaged_gguf_is_a_model_error_naming_it(files: dict[str, Path], name: str, call: str) -> None:
    got = raised_in_subprocess(call.format(path=str(files[name])))
    assert re.fullmatch(rf"ModelError: llama.cpp could not (load|read) {re.escape(str(files[name]))}: \S.*", got), got


@pytest.mark.parametrize(("kwargs", "error"), [
    ({"ga_n": 0}, "ParameterError"),
    ({"ga_n": -3}, "ParameterError"),
    ({"ga_n": "4", "ga_w": 64}, "ParameterError"),
    ({"ga_n": 2, "ga_w": 0}, "ParameterError"),
    ({"ga_n": 2, "ga_w": L}, "ParameterError"),
])
def test_load_refuses_bad_g_and_w(files: dict[str, Path], kwargs: dict[str, object], error: str) -> None:
    import selfext_cpp

    with pytest.raises(getattr(selfext_cpp, error)) as err:
        selfext_cpp.load(files["tiny"], **kwargs)
    assert "ga" in str(err.value).replace("-", "_") and "\n" not in str(err.value)


def test_load_with_self_extend_on_a_model_without_rope_is_unsupported(files: dict[str, Path]) -> None:
    import selfext_cpp

    with pytest.raises(selfext_cpp.UnsupportedModelError) as err:
        selfext_cpp.load(files["gpt2"], ga_n=2, ga_w=16)
    assert "rotary position embedding" in str(err.value)


def test_enable_self_extend_refuses_bad_values_on_a_loaded_model(files: dict[str, Path]) -> None:
    import selfext_cpp

    llm = selfext_cpp.load(files["tiny"], n_ctx=L)
    try:
        for args in ((0,), (2, -1), (2, L)):
            with pytest.raises(selfext_cpp.ParameterError):
                selfext_cpp.enable_self_extend(llm, *args)
        assert selfext_cpp.get_self_extend(llm) == selfext_cpp.SelfExtend()  # unchanged
    finally:
        llm.close()


def test_text_beyond_the_capacity_is_a_capacity_error_with_a_setting_that_fits() -> None:
    from selfext_cpp import CapacityError, SelfExtend, choose

    with pytest.raises(CapacityError) as err:
        SelfExtend(2, 64).check(L, 1000)
    assert "1000 tokens exceed the capacity 448" in str(err.value)
    with pytest.raises(CapacityError, match="too many"):
        choose(L, 10**6)


@pytest.mark.parametrize("spec", ["own er/repo:Q4_0", "owner/repo:", "owner/repo/weights.bin", "a--b/repo"])
def test_a_bad_hub_reference_is_a_parameter_error(spec: str) -> None:
    from selfext_cpp.errors import ParameterError
    from selfext_cpp.hub import parse_ref

    with pytest.raises(ParameterError, match="invalid Hugging Face reference"):
        parse_ref(spec)


def test_a_prompt_longer_than_the_context_is_llama_cpp_pythons_value_error(files: dict[str, Path]) -> None:
    import selfext_cpp

    llm = selfext_cpp.load(files["tiny"], n_ctx=L)
    try:
        with pytest.raises(ValueError, match=rf"Requested tokens \(\d+\) exceed context window of {L}"):
            llm.create_completion("hello world " * 200, max_tokens=4)
    finally:
        llm.close()


def test_a_prompt_between_the_asked_and_the_padded_context_is_served(files: dict[str, Path]) -> None:
    # llama.cpp pads n_ctx=64 to 256; load() asks llama-cpp-python for the padded size, whose token buffers
    # would otherwise hold 64 and fail on 65-255-token prompts with a numpy broadcast error
    import selfext_cpp

    llm = selfext_cpp.load(files["tiny"], n_ctx=64)
    try:
        assert llm.n_ctx() == L
        out = llm.create_completion("hello world " * 50, max_tokens=2)
        assert 64 < out["usage"]["prompt_tokens"] < L
    finally:
        llm.close()
