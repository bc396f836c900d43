"""`selfext eval passkey | ppl | speed` on a tiny model: JSON documents, tables, exit codes, Ctrl-C, --help."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tinymodel import TinyModel
from typer.testing import CliRunner

from selfext_cpp.cli.eval import app
from selfext_cpp.eval.passkey import PasskeyRun
from selfext_cpp.eval.ppl import PplRun
from selfext_cpp.eval.speed import SpeedRun

runner = CliRunner()
SMALL = ["-t", "2", "-b", "64"]
PASSKEY = ["passkey", "--lengths", "300,400", "--depths", "10,90", "--trials", "2", "--ga-n", "4", "--ga-w", "16",
           "-n", "4", *SMALL]


def invoke(*args: str) -> Any:
    return runner.invoke(app, list(args))


def test_passkey_json_document(tiny: TinyModel) -> None:
    result = invoke(*PASSKEY, str(tiny.path), "--modes", "vanilla,selfext,shift", "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)  # exactly one JSON document on stdout
    assert doc["schema"] == "selfext.eval.passkey/1"
    assert doc["complete"] is True
    assert doc["model"] == {"path": str(tiny.path), "n_ctx_train": 64}
    assert doc["config"] == {"lengths": [300, 400], "depths": [0.1, 0.9], "trials": 2,
                             "modes": ["vanilla", "selfext", "shift"], "seed": 0, "haystack": "repeat", "ga_n": 4,
                             "ga_w": 16, "auto": False, "n_predict": 4, "n_batch": 64}
    assert [(s["mode"], s["length"], s["ga_n"], s["ga_w"]) for s in doc["settings"]] == [
        ("vanilla", 300, 1, 0), ("selfext", 300, 4, 16), ("shift", 300, 4, 16),
        ("vanilla", 400, 1, 0), ("selfext", 400, 4, 16), ("shift", 400, 4, 16)]
    assert len(doc["results"]) == 2 * 2 * 2 * 3
    assert set(doc["results"][0]) == {"mode", "length", "n_tokens", "depth", "trial", "key", "key_position",
                                      "output", "correct", "ga_n", "ga_w", "rope_factor", "seconds", "reused"}
    assert len(doc["accuracy"]) == 2 * 2 * 3
    assert all(a["trials"] == 2 and 0.0 <= a["accuracy"] <= 1.0 for a in doc["accuracy"])


def test_passkey_table_and_plot(tiny: TinyModel, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    plot = tmp_path / "passkey.png"
    result = invoke(*PASSKEY, str(tiny.path), "--modes", "vanilla,yarn", "--plot", str(plot))
    assert result.exit_code == 0, result.stderr
    assert "passkey accuracy" in result.stdout
    assert "×4.75" in result.stdout  # yarn's factor at 300 tokens: (300 + 4) / 64
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"plot written to {plot}" in result.stderr


def interrupt_after_first(monkeypatch: pytest.MonkeyPatch, run_class: type = PasskeyRun) -> None:
    original = run_class.run

    def run(self: Any, *args: Any, **kwargs: Any) -> Iterator[Any]:
        gen = original(self, *args, **kwargs)
        yield next(gen)
        raise KeyboardInterrupt

    monkeypatch.setattr(run_class, "run", run)


def test_ctrl_c_prints_the_partial_json_and_exits_130(tiny: TinyModel, monkeypatch: pytest.MonkeyPatch) -> None:
    interrupt_after_first(monkeypatch)
    result = invoke(*PASSKEY, str(tiny.path), "--json")
    assert result.exit_code == 130
    doc = json.loads(result.stdout)
    assert doc["complete"] is False
    assert len(doc["results"]) == 1
    assert "interrupted" in result.stderr


def test_ctrl_c_prints_the_partial_table(tiny: TinyModel, monkeypatch: pytest.MonkeyPatch) -> None:
    interrupt_after_first(monkeypatch)
    result = invoke(*PASSKEY, str(tiny.path))
    assert result.exit_code == 130
    assert "passkey accuracy (interrupted: partial)" in result.stdout
    assert "vanilla" in result.stdout


@pytest.mark.parametrize(("run_class", "args", "title"), [
    (PplRun, ["ppl", "--lengths", "48,128", "--window", "16", "--ga-n", "4", "--ga-w", "16", *SMALL],
     "perplexity of the final window (interrupted: partial)"),
    (SpeedRun, ["speed", "--depths", "0,100", "-p", "16", "-n", "2", "-r", "1", "--fa", "off", "--ga-n", "4",
                "--ga-w", "16", *SMALL], "speed (tokens/s, median) (interrupted: partial)"),
])
def test_ctrl_c_reports_what_ppl_and_speed_measured(tiny: TinyModel, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                    run_class: type, args: list[str], title: str) -> None:
    if run_class is PplRun:
        text = tmp_path / "text.txt"
        text.write_text(" ".join(["the hello world"] * 200))
        args = [*args, "-f", str(text)]
    interrupt_after_first(monkeypatch, run_class)
    table = invoke(*args, str(tiny.path))
    assert table.exit_code == 130 and "interrupted" in table.stderr
    assert title in " ".join(table.stdout.split())  # a narrow table wraps its title
    doc = json.loads(invoke(*args, str(tiny.path), "--json").stdout)
    assert doc["complete"] is False and len(doc["results"]) == 1


def test_ppl_json_and_plot_from_a_text_file(tiny: TinyModel, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    text = tmp_path / "text.txt"
    text.write_text(" ".join(["the hello world"] * 200))
    result = invoke("ppl", str(tiny.path), "-f", str(text), "--lengths", "48,128", "--window", "16",
                    "--ga-n", "4", "--ga-w", "16", *SMALL, "--json", "--plot", str(tmp_path / "ppl.png"))
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["schema"] == "selfext.eval.ppl/1"
    assert (tmp_path / "ppl.png").read_bytes()[:4] == b"\x89PNG"
    assert doc["text"]["source"] == str(text) and doc["text"]["tokens"] > 128
    assert [(r["mode"], r["length"]) for r in doc["results"]] == [
        ("vanilla", 48), ("selfext", 48), ("vanilla", 128), ("selfext", 128)]
    assert all(r["ppl"] > 1.0 and r["window"] == 16 for r in doc["results"])


def test_ppl_refuses_a_text_shorter_than_the_longest_length(tiny: TinyModel, tmp_path: Path) -> None:
    text = tmp_path / "short.txt"
    text.write_text("the hello world")
    result = invoke("ppl", str(tiny.path), "-f", str(text), "--lengths", "48", "--window", "16", *SMALL)
    assert result.exit_code == 2
    assert result.stderr.startswith("selfext: error: the text has")


def test_speed_json_with_ratios(tiny: TinyModel) -> None:
    result = invoke("speed", str(tiny.path), "--depths", "0,100", "-p", "16", "-n", "2", "-r", "1", "--fa", "off",
                    "--ga-n", "4", "--ga-w", "16", *SMALL, "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["schema"] == "selfext.eval.speed/1"
    assert [(r["depth"], r["flash_attn"], r["mode"]) for r in doc["results"]] == [
        (0, False, "vanilla"), (0, False, "selfext"), (100, False, "vanilla"), (100, False, "selfext")]
    assert [(r["depth"], r["flash_attn"]) for r in doc["ratios"]] == [(0, False), (100, False)]
    assert all(r["prefill"] > 0 and r["decode"] > 0 for r in doc["ratios"])
    assert [r["ga_keys"] for r in doc["results"]] == [None] * 4  # flash attention off: no fused op


@pytest.mark.parametrize("keys", ["auto", "table", "cache"])
def test_speed_times_the_form_of_the_grouped_keys_asked_for(tiny: TinyModel, keys: str) -> None:
    result = invoke("speed", str(tiny.path), "--depths", "100", "-p", "16", "-n", "2", "-r", "1", "--fa", "on",
                    "--ga-n", "4", "--ga-w", "16", "--ga-keys", keys, *SMALL, "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["config"]["ga_keys"] == keys
    assert [(r["mode"], r["ga_keys"]) for r in doc["results"]] == [
        ("vanilla", None), ("selfext", "steps" if keys == "auto" else keys)]  # auto on the CPU: the steps form


@pytest.mark.parametrize("args, message", [
    (["passkey", "--auto", "--ga-n", "4", "--ga-w", "16"], "give either --auto or --ga-n/--ga-w, not both"),
    (["passkey", "--ga-w", "16"], "--ga-w needs --ga-n"),
    (["ppl", "--ga-n", "0"], "--ga-n must be an integer >= 1, got 0"),
    (["passkey", "--modes", "vanilla,rope"], "unknown mode rope"),
    (["passkey", "--lengths", "4q"], "not a token count"),
    (["passkey", "--modes", "shift", "--ga-n", "3", "--ga-w", "16"], "multiple of --ga-n"),
    (["speed", "--fa", "maybe"], "--fa takes"),
    (["speed", "--ga-keys", "rows"], "--ga-keys is one of auto, steps, table, cache, not 'rows'"),
])
def test_usage_errors_exit_2_with_one_line(tiny: TinyModel, args: list[str], message: str) -> None:
    result = invoke(*args[:1], str(tiny.path), *args[1:], *SMALL)
    assert result.exit_code == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("command", ["passkey", "ppl", "speed", ""])
def test_help_ends_with_a_real_example(command: str) -> None:
    result = invoke(*([command] if command else []), "--help")
    assert result.exit_code == 0
    last = result.stdout.rstrip().split("\n\n")[-1]  # the paragraph after the options
    assert " ".join(last.split()).startswith(f"Example: selfext eval {command or 'passkey'} ")


def test_best_ratios_take_the_faster_setting_of_each_side() -> None:
    from selfext_cpp.eval.speed import SpeedResult, best_ratios

    def r(fa: bool, mode: str, pp: float, tg: float) -> SpeedResult:
        return SpeedResult(8192, fa, mode, 4 if mode == "selfext" else 1, 0, pp, tg, [pp], [tg])

    got = best_ratios([r(False, "vanilla", 80, 27), r(False, "selfext", 40, 20),
                       r(True, "vanilla", 105, 18), r(True, "selfext", 100, 25)])
    assert got == [{"depth": 8192, "prefill": round(100 / 105, 3), "decode": round(25 / 27, 3)}]
