"""benchmarks/gpu_check.sh never runs here (no GPU): at least keep it in step with the library it calls."""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"


def _python_block() -> str:
    match = re.search(r"<<'PY'\n(.*?)\nPY\n", SCRIPT.read_text(), re.S)
    assert match, "gpu_check.sh lost its embedded Python block"
    return match.group(1)


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_shell_syntax() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_every_radtrt_name_it_imports_exists() -> None:
    tree = ast.parse(_python_block())
    imported = [(node.module, alias.name) for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                and node.module and node.module.startswith("radtrt") for alias in node.names]
    assert len(imported) >= 10
    for module, name in imported:
        assert hasattr(importlib.import_module(module), name), f"{module}.{name}"


def test_keyword_arguments_it_passes_exist() -> None:
    """Calls of imported radtrt functions/classes use keywords their signatures accept."""
    tree = ast.parse(_python_block())
    names = {alias.asname or alias.name: getattr(importlib.import_module(node.module), alias.name)
             for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
             and node.module.startswith("radtrt") for alias in node.names}
    checked = 0
    for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call)):
        func = call.func
        target = None
        if isinstance(func, ast.Name) and func.id in names:
            target = names[func.id]
        elif isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id in names:
            target = getattr(names[func.value.id], func.attr, None)  # e.g. BuildLimits.for_llava, ActivationStats.load
        if target is None or not callable(target):
            continue
        params = inspect.signature(target).parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            continue
        for kw in call.keywords:
            if kw.arg is not None:
                assert kw.arg in params, f"{ast.unparse(func)}(..., {kw.arg}=...) in gpu_check.sh"
        checked += 1
    assert checked >= 8
