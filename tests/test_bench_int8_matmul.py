"""benchmarks/int8_matmul.py: the decode step's matrix products, fp32 against radtrt's two INT8 forms."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "int8_matmul.py"


def _module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("int8_matmul", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shapes_are_the_fused_bundles_products() -> None:
    from radtrt.model.config import preset

    d = preset("mid").decoder
    shapes = _module().decoder_shapes("mid")
    assert len(shapes) == 4 * d.num_hidden_layers + 1 and shapes[-1] == (d.hidden_size, d.vocab_size)
    assert (d.hidden_size, 2 * d.intermediate_size) in shapes and (d.intermediate_size, d.hidden_size) in shapes


def test_int8_graphs_compute_the_fp32_products(tmp_path: Path) -> None:
    """Each INT8 graph is the same products as the fp32 one (same random weights), within INT8 rounding."""
    module = _module()
    shapes = [(64, 96), (96, 64)]
    x = {f"x{k}": np.random.default_rng(1).standard_normal((1, k), dtype=np.float32) for k in (64, 96)}
    results = {kind: ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, x)
               for kind, path in module.build_graphs(shapes, tmp_path).items()}
    for kind in ("w8a8", "w8-nbits"):
        for got, want in zip(results[kind], results["fp32"]):
            assert np.abs(got - want).max() <= 0.03 * np.abs(want).max(), kind


def test_script_prints_ratios_and_the_command() -> None:
    run = subprocess.run([sys.executable, str(SCRIPT), "--preset", "tiny", "--runs", "1"], capture_output=True,
                         text=True, check=True)
    assert "w8a8" in run.stdout and "x fp32" in run.stdout and "reproduce: python" in run.stdout


@pytest.mark.parametrize("args", [["--preset", "bogus"], ["--runs", "0"], ["--threads", "-1"]])
def test_bad_arguments_are_one_usage_line(args: list[str]) -> None:
    """An unknown preset ended in a RadtrtError traceback; --runs 0 printed 'nan ms' with exit 0."""
    run = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True)
    assert run.returncode == 2 and "Traceback" not in run.stderr and "error: argument" in run.stderr
