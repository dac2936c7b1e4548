"""The README names what radtrt writes: each name checked here is taken from the code that writes it, so a file
added to an output (or renamed) without the README saying so fails here, not in a user's hands."""

from __future__ import annotations

import re
from pathlib import Path

README = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")


def _paragraph(start: str) -> str:
    """The README's paragraph (or table row) that begins with ``start``, up to the next blank line."""
    i = README.index(start)
    end = README.find("\n\n", i)
    return README[i:end if end != -1 else None]


def test_run_folder_names_stage2_lora_files() -> None:
    from radtrt.training.outputs import LORA_DIR, LORA_FILES

    text = _paragraph("A run folder holds")
    assert f"`{LORA_DIR}/`" in text and all(f"`{name}`" in text for name in LORA_FILES)


def test_predictions_out_names_its_marker() -> None:
    from radtrt.benchmarks.parity import PREDICTION_FILES, PREDICTIONS_MARKER

    row = next(line for line in README.splitlines() if line.startswith("| `radtrt bench latency"))
    assert all(f"DIR/{name}" in row for name in (*PREDICTION_FILES, PREDICTIONS_MARKER))


def test_convert_names_every_file_of_the_toolkit_layout(tmp_path: Path) -> None:
    from radtrt.model.loading import LoadedModel, save_toolkit
    from radtrt.model.tiny import random_model, train_tiny_tokenizer

    save_toolkit(LoadedModel(random_model(), train_tiny_tokenizer(), "t", {}), tmp_path / "m")
    text = _paragraph("`convert` merges the LoRA adapter")
    layout = re.search(r"radtrt's own layout\s*\(([^)]*)\)", text)
    assert layout is not None
    assert {p.name for p in (tmp_path / "m").iterdir()} == set(re.findall(r"`([^`]+)`", layout.group(1)))


def test_sr_file_mode_is_documented() -> None:
    row = next(line for line in README.splitlines() if line.startswith("| `radtrt infer"))
    assert "mode 0600" in row and "chmod" in row  # tests/test_sr.py checks the files are 0600


def test_exit_codes_name_the_judge_streak_and_its_resume() -> None:
    from radtrt.evaluation.chexprompt.config import JudgeConfig

    streak = JudgeConfig.__dataclass_fields__["max_consecutive_failures"].default
    text = " ".join(_paragraph("Exit codes:").split())
    assert f"judge failed {streak} reports in a row" in text and "judge cache" in text and "resumes" in text


def test_memory_bounds_show_their_arithmetic() -> None:
    """27.4 / 13.0 / 25.9 GB stood with no parameter counts: each is a count from the meta-device model times the
    dtype's bytes, and the README shows both, so the figures can be checked."""
    import torch

    from radtrt.model.config import preset
    from radtrt.model.llava_rad import LlavaRad

    with torch.device("meta"):
        model = LlavaRad(preset("llava-rad"))
    params = sum(p.numel() for p in model.parameters())
    lora_targets = sum(m.weight.numel() for m in model.language_model.model.layers.modules()
                       if isinstance(m, torch.nn.Linear))
    text = " ".join(_paragraph("Before any model load").split())
    assert f"{params:,} parameters x 4 bytes" in text and f"{params * 4 / 1e9:.1f} GB" in text
    assert f"{lora_targets:,} weights" in text
    assert f"{lora_targets * 2 / 1e9:.1f} GB" in text and f"{lora_targets * 4 / 1e9:.1f} GB" in text


def test_named_tests_exist() -> None:
    """A README claim 'a test checks this' names the test, and the name stays true."""
    import ast

    named = set(re.findall(r"`(tests/test_\w+\.py)::(test_\w+)`", README))
    assert ("tests/test_int8_export.py", "test_seven_bit_weights_are_computed_exactly_by_onnx_runtime") in named
    root = Path(__file__).resolve().parent.parent
    for file, name in named:
        tree = ast.parse((root / file).read_text(encoding="utf-8"))
        assert name in {f.name for f in tree.body if isinstance(f, ast.FunctionDef)}, (file, name)


def test_big_model_recipe_runs(tmp_path: Path) -> None:
    """The BIG model of "Export memory" is built by the README's one-liner; run here at the tiny preset's size."""
    import json
    import os
    import subprocess
    import sys

    line = re.search(r'python -c "(import dataclasses as dc;[^"]*)"', README)
    assert line is not None and "preset('llava-rad')" in line.group(1)
    code = line.group(1).replace("preset('llava-rad')", "preset('tiny')")
    env = os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, check=True, timeout=300)
    config = json.loads((tmp_path / "BIG" / "config.json").read_text())
    assert config["model"]["decoder"]["num_hidden_layers"] == 3
