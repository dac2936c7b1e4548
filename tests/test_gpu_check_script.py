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


def test_calls_bind_to_the_signatures() -> None:
    """Calls of imported radtrt functions/classes use keywords their signatures accept, and pass every argument
    they require (a new required argument left the script calling with one too few: a TypeError on the GPU host)."""
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
        if not any(isinstance(a, ast.Starred) for a in call.args) and all(k.arg for k in call.keywords):
            try:
                inspect.signature(target).bind(*call.args, **{k.arg: k.value for k in call.keywords if k.arg})
            except TypeError as e:
                raise AssertionError(f"{ast.unparse(call)} in gpu_check.sh: {e}") from None
        checked += 1
    assert checked >= 8


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_without_a_gpu_it_stops_in_one_line_before_making_anything(tmp_path: Path) -> None:
    import os
    import sys

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(SCRIPT.parents[1]), "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(["bash", str(SCRIPT), "", str(tmp_path / "work")], capture_output=True, text=True,
                            env=env, timeout=120)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "gpu_check.sh: no CUDA GPU here (see 'radtrt doctor'); run it on the GPU host"], result.stderr
    assert not (tmp_path / "work").exists()


def test_calibration_files_are_read_as_the_export_reads_them() -> None:
    """CALIB= went through ActivationStats.load, which refuses what 'radtrt calibrate -o' writes."""
    block = _python_block()
    assert "load_activation_stats(Path(os.environ[\"CALIB\"]), loaded.model)" in block
    assert "ActivationStats.load(" not in block and "check_same_model(bundle, loaded.model)" in block


def test_calibration_is_checked_before_the_reference_casts_the_model_to_float16() -> None:
    """'.to("cuda", torch.float16)' casts in place: CALIB checked after it compared the fp16 weights with the
    fp32 ones it was made from, and every run with CALIB= stopped ('calibrated on other weights')."""
    block = _python_block()
    assert block.index('load_activation_stats(Path(os.environ["CALIB"])') < block.index('.to("cuda", torch.float16)')


def test_studies_are_read_as_bench_reads_them() -> None:
    """STUDIES went through iterdir(): a phantom set's README.txt and manifest, or a synthetic set's hidden
    records, were taken for studies, while the bench commands later in the script read the same folder right."""
    block = _python_block()
    assert 'study_paths(Path(os.environ["STUDIES"])' in block and ".iterdir()" not in block
