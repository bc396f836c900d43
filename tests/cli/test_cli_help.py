"""`--help` of every command at 80 columns: help text beside the options in a readable column, switches without
a value placeholder, and a real example at the end that fits the width."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

COMMANDS = [[], ["run"], ["pull"], ["info"], ["serve"], ["eval"], ["eval", "passkey"], ["eval", "ppl"], ["rpc-server"],
            ["eval", "speed"]]
WIDTH = 80
MIN_HELP_COLUMN = 35  # characters of option help per line; typer's rich panels left ~15 at 80 columns


def render(command: list[str]) -> str:
    from selfext_cpp.cli.app import app

    result = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": str(WIDTH)})
    assert result.exit_code == 0, result.output
    return result.stdout


def sections(text: str) -> dict[str, list[str]]:
    """The lines under each ``Heading:`` line (Arguments, Options, Commands)."""
    out: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        m = re.fullmatch(r"([A-Z][a-z]+):", line)
        if m:
            current = out.setdefault(m[1], [])
        elif current is not None:
            if not line.strip():
                current = None
            else:
                current.append(line)
    return out


@pytest.mark.parametrize("command", COMMANDS, ids=[" ".join(c) or "selfext" for c in COMMANDS])
def test_help_fits_80_columns_with_a_wide_help_column(command: list[str]) -> None:
    text = render(command)
    assert max(map(len, text.splitlines())) <= WIDTH
    assert not re.search(r"[╭╰│]", text)  # no panels: their columns squeeze the help text
    found = sections(text)
    assert "Options" in found
    for name, lines in found.items():
        for line in lines:
            indent = len(line) - len(line.lstrip())
            if indent == 2:  # an entry: name column, two or more spaces, help
                m = re.match(r"  (\S+(?: \S+)*)( {2,})\S", line)
                if not m:  # a name too long for the first column stands alone; its help follows below
                    continue
                start = 2 + len(m[1]) + len(m[2])
            else:  # the help continued
                start = indent
            assert WIDTH - start >= MIN_HELP_COLUMN, f"{name}: help starts at column {start}: {line!r}"


@pytest.mark.parametrize("command", COMMANDS, ids=[" ".join(c) or "selfext" for c in COMMANDS])
def test_switches_take_no_placeholder(command: list[str]) -> None:
    text = render(command)
    assert "<bool>" not in text and "BOOLEAN" not in text
    for switch in ("--json", "--verbose", "--auto", "--quiet", "--logprobs", "--help"):
        for line in text.splitlines():
            if re.search(rf"(^|, ){switch}(?![\w-])", line.lstrip()):
                assert re.search(rf"{switch}(  |$)", line), line


@pytest.mark.parametrize("command", COMMANDS, ids=[" ".join(c) or "selfext" for c in COMMANDS])
def test_help_ends_with_a_real_example(command: list[str]) -> None:
    paragraphs = render(command).strip().split("\n\n")
    last = paragraphs[-1].splitlines()
    assert last[0].strip() == "Example:"
    example = " ".join(line.strip().rstrip("\\").strip() for line in last[1:])
    invoked = " ".join(["selfext", *command]) if command else "selfext run"
    assert invoked in example
    assert example.startswith(("selfext ", "cat "))


def test_options_keep_their_spellings() -> None:
    text = render(["run"])
    for spelling in ("-gan, --ga-n G", "-gaw, --ga-w W", "-c, --ctx-size N", "-fa, --flash-attn / -no-fa, "
                     "--no-flash-attn", "--chat / --no-chat", "-ngl, --n-gpu-layers N", "-p, --prompt TEXT",
                     "-f, --file FILE"):
        assert spelling in text
