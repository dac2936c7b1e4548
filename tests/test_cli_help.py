"""Every command's --help shows each option's help text whole (rich markup must not eat any of it)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator

import pytest
import typer
from typer.testing import CliRunner

from radtrt.cli import app

runner = CliRunner()


def _commands(command: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():
        yield from _commands(sub, (*path, name))


def _flat(text: str) -> str:
    return re.sub(r"\s+", " ", text.replace("│", " ")).strip()


def test_every_option_help_is_shown_whole() -> None:
    checked = 0
    for path, command in _commands(typer.main.get_command(app)):
        result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "250"})  # no word cropped at 80
        assert result.exit_code == 0, (path, result.output)
        shown = _flat(result.output)
        summary = (command.help or "").split("\n\n")[0]
        assert _flat(summary) in shown, path
        for param in command.params:
            help_text = getattr(param, "help", None)
            if help_text:
                assert _flat(help_text.replace("\\[", "[")) in shown, (path, param.name)  # "\\[": a literal "["
                assert "(default: (" not in shown and "[default: (" not in shown  # str show_default's parentheses
                checked += 1
    assert checked > 50


def test_usage_errors_are_one_line_and_exit_2() -> None:
    """They were a usage line, a hint and an error box over five lines of stderr."""
    import subprocess
    import sys

    for args, match in ((["infer", "--bogus", "x"], "No such option: --bogus"),
                        (["infer", "--max-new-tokens", "abc", "x"], "Invalid value for '--max-new-tokens'"),
                        (["data", "phantoms", "--n", "0", "-o", "x"], "Invalid value for '--n'")):
        run = subprocess.run([sys.executable, "-m", "radtrt.cli", *args], capture_output=True, text=True, timeout=120)
        lines = run.stderr.strip().splitlines()
        assert run.returncode == 2 and len(lines) == 1, run.stderr
        assert lines[0].startswith("radtrt: error: ") and match in lines[0] and lines[0].endswith("--help')")
        assert run.stdout == ""


def test_every_path_parameter_refuses_an_empty_value() -> None:
    """An unset shell variable (``radtrt infer "$STUDY"``) made an empty path, which meant this folder."""
    import inspect

    checked = 0
    for path, command in _commands(typer.main.get_command(app)):
        if command.callback is None:
            continue
        hints = inspect.signature(inspect.unwrap(command.callback), eval_str=True).parameters
        for param in command.params:
            if param.name not in hints or "Path" not in str(hints[param.name].annotation):
                continue
            given = [""] * max(param.nargs, 1)
            args = [*path, *given] if param.param_type_name == "argument" else [*path, param.opts[0], *given]
            result = runner.invoke(app, args)
            assert result.exit_code == 2 and "is empty" in result.output, (args, result.output)
            checked += 1
    assert checked > 40


@pytest.mark.parametrize("args, example", [
    (["bench", "latency", "--synthetic", "1"], "report.md"), (["bench", "parity", "--synthetic", "1"], "report.md"),
    (["calibrate", "--model", "m", "--data", "d"], "calibration.safetensors"), (["eval", "p.jsonl"], "results.json"),
    (["data", "synthesize", "l.jsonl"], "manifest.jsonl")])
@pytest.mark.parametrize("spelling", ["newdir/", "newdir/.", "-"])
def test_a_file_output_given_as_a_folder_is_refused(args: list[str], example: str, spelling: str,
                                                    tmp_path: Path) -> None:
    """'bench parity -o newdir/' (or newdir/.) wrote a file named newdir and newdir.json, and said so: Path drops
    the slash. The example file name is one the option takes (a calibration file must end in .safetensors)."""
    result = runner.invoke(app, [*args, "-o", spelling if spelling == "-" else f"{tmp_path}/{spelling}"],
                           env={"COLUMNS": "400"})
    assert result.exit_code == 2, result.output
    expected = (f"'-' is not standard output here: give the file to write (say {example})" if spelling == "-" else
                f"names a folder: give the file to write (say {tmp_path}/newdir/{example})")
    assert expected in result.output, result.output
    assert not (tmp_path / "newdir").exists()


def test_usage_names_each_argument_in_capitals() -> None:
    """typer 0.29 wrote the parameter's Python name: 'infer [OPTIONS] {studies}...', 'train resume {run}'. Each
    argument has a metavar, shown in capitals as usage lines spell placeholders (the braces are typer's mark of a
    required argument)."""
    checked = 0
    for path, command in _commands(typer.main.get_command(app)):
        arguments = [p for p in command.params if p.param_type_name == "argument"]
        if not arguments:
            continue
        result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "250"})
        usage = next(line for line in result.output.splitlines() if "Usage:" in line)
        for param in arguments:
            assert param.metavar and param.metavar.isupper(), (path, param.name)
            assert f"{{{param.metavar}}}" in usage and f"{{{param.name}}}" not in usage, (path, usage)
            checked += 1
    assert checked >= 5
    usage = next(line for line in runner.invoke(app, ["infer", "--help"], env={"COLUMNS": "250"}).output.splitlines()
                 if "Usage:" in line)
    assert usage.rstrip().endswith("infer [OPTIONS] {STUDY}...")


def test_help_texts_and_messages_use_us_spelling() -> None:
    """'initialised' beside 'Initialization', 'recognises' beside 'recognized': help texts (command docstrings
    and option help) and the strings radtrt prints (every string literal that is not a docstring) use US spelling."""
    import ast
    from pathlib import Path

    british = re.compile(r"\b(initialis|recognis)\w*", re.IGNORECASE)
    found = []
    for path, command in _commands(typer.main.get_command(app)):
        for text in [command.help or "", *(getattr(p, "help", None) or "" for p in command.params)]:
            found += [(path, m.group(0)) for m in british.finditer(text)]
    root = Path(__file__).resolve().parent.parent / "radtrt"
    for source in root.rglob("*.py"):
        tree = ast.parse(source.read_text(encoding="utf-8"))
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                      and node.body and isinstance(node.body[0], ast.Expr)
                      and isinstance(node.body[0].value, ast.Constant)}
        found += [(source.name, node.lineno, m.group(0)) for node in ast.walk(tree)
                  if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
                  for m in british.finditer(node.value)]
    assert not found, found
