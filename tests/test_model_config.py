"""Model configs read from files: what a hand-edited config.json gets (one line, not a torch traceback)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from radtrt.cli import app
from radtrt.errors import RadtrtError
from radtrt.model.config import PRESETS, LlavaRadConfig, config_problem, preset


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_valid_and_round_trip(name: str) -> None:
    cfg = preset(name)
    assert config_problem(cfg) is None
    assert LlavaRadConfig.from_dict(json.loads(cfg.to_json())) == cfg


@pytest.mark.parametrize("part, key, value, match", [
    ("decoder", "hidden_size", "64", "is not a int"),
    ("decoder", "num_hidden_layers", -1, "must be positive"),
    ("decoder", "num_key_value_heads", 3, "do not divide"),
    ("decoder", "tie_word_embeddings", 1, "is not a bool"),
    ("vision", "num_heads", 5, "do not fit"),
    ("vision", "img_size", 57, "img_size 57 is not a multiple of patch_size 14"),  # ran on 56 of 57 pixels, exit 0
    ("vision", "depth", True, "is not a int"),
    ("vision", "mlp_ratio", "4", "is not a float"),
    # each of these was a traceback (or a hang) when the model was built or run
    ("decoder", "hidden_size", 10**12, "is above"),  # torch's storage-size overflow
    ("decoder", "num_hidden_layers", 10**9, "is above 1024"),  # built layers for ever
    ("vision", "mlp_ratio", -4, "mlp_ratio"),
    ("vision", "init_values", "abc", "init_values"),
    (None, "mm_vision_select_layer", "x", "mm_vision_select_layer"),
    (None, "mm_vision_select_layer", 100, "not a hidden state of a 3-block trunk"),  # wrapped around silently
    (None, "mm_vision_select_feature", "bogus", "mm_vision_select_feature"),
    (None, "image_mean", [1, 2], "image_mean"),
    (None, "image_mean", "abc", "image_mean"),
    (None, "image_std", [0, 0, 0], "image_std"),
    # a model that ran with exit 0 and wrote empty reports (NaN everywhere) or never stopped
    ("decoder", "rms_norm_eps", float("nan"), "rms_norm_eps = nan must be a positive finite number"),
    ("decoder", "rope_theta", -1.0, "rope_theta = -1.0 must be a positive finite number"),
    ("vision", "eps", 0.0, "eps = 0.0 must be a positive finite number"),
    ("decoder", "eos_token_id", 5000, "eos_token_id = 5000 is not a token of the 512-token vocabulary"),
    # accepted, and written into a release radtrt's own loader refused
    (None, "conv_template", "chatml", "conv_template = 'chatml' is not one of v1, plain"),
])
def test_malformed_values_are_refused(part: str | None, key: str, value: object, match: str) -> None:
    d = json.loads(preset("tiny").to_json())
    (d if part is None else d[part])[key] = value
    with pytest.raises(RadtrtError, match=match):
        LlavaRadConfig.from_dict(d)


def test_cli_refuses_a_hand_edited_model_config(tmp_path: Path) -> None:
    from radtrt.model.loading import LoadedModel, save_toolkit
    from radtrt.model.tiny import random_model, train_tiny_tokenizer

    model_dir = tmp_path / "model"
    save_toolkit(LoadedModel(random_model(preset("tiny"), seed=0), train_tiny_tokenizer(), "tiny"), model_dir)
    config = model_dir / "config.json"
    d = json.loads(config.read_text())
    d["model"]["decoder"]["num_attention_heads"] = 0
    config.write_text(json.dumps(d))
    result = CliRunner().invoke(app, ["convert", "--model", str(model_dir), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and "must be positive" in result.stderr and "Traceback" not in result.stderr
    assert f"{config} is malformed" in " ".join(result.stderr.split())  # it said only "radtrt model config"


@pytest.mark.parametrize("damage, match", [("nan", "NaN or infinite"), ("inf", "NaN or infinite"),
                                           ("int", "not a floating-point type")])
def test_weights_that_are_not_finite_floats_are_refused(tmp_path: Path, damage: str, match: str) -> None:
    """A diverged run's NaN weights used to export and serve garbage reports without a word."""
    import torch

    from radtrt.model.io import load_tensors, save_tensors
    from radtrt.model.loading import WEIGHTS_FILE, LoadedModel, load_model, save_toolkit
    from radtrt.model.tiny import random_model, train_tiny_tokenizer

    model_dir = tmp_path / "model"
    save_toolkit(LoadedModel(random_model(preset("tiny"), seed=0), train_tiny_tokenizer(), "tiny"), model_dir)
    state = dict(load_tensors(model_dir / WEIGHTS_FILE))
    name = next(k for k in state if k.endswith("mlp.fc2.weight"))
    weight = state[name].clone()
    if damage == "int":
        weight = weight.to(torch.int32)
    else:
        weight.view(-1)[3] = float(damage)
    state[name] = weight
    save_tensors(state, model_dir / WEIGHTS_FILE)
    with pytest.raises(RadtrtError, match=match) as err:
        load_model(model_dir)
    assert name in str(err.value)
    result = CliRunner().invoke(app, ["convert", "--model", str(model_dir), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and match in result.stderr and not (tmp_path / "out").exists()


def test_base_model_beside_a_merged_model_folder_is_refused(tmp_path: Path) -> None:
    """It used to be ignored without a word, so a user could believe another base was in use."""
    from radtrt.model.loading import LoadedModel, save_toolkit
    from radtrt.model.tiny import random_model, train_tiny_tokenizer

    model_dir = tmp_path / "model"
    save_toolkit(LoadedModel(random_model(preset("tiny"), seed=0), train_tiny_tokenizer(), "tiny"), model_dir)
    result = CliRunner().invoke(app, ["convert", "--model", str(model_dir), "--base-model", str(tmp_path),
                                      "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and "drop --base-model" in result.stderr and not (tmp_path / "out").exists()


@pytest.mark.parametrize("content, match", [
    (b"hello this is text\n" * 10, "not a PyTorch file"),  # was a KeyError traceback
    (b"abcd", "not a PyTorch file"),  # struct.error
    (b"\x80\x02junk", "not a PyTorch file"),  # IndexError
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 12\n", "Git LFS pointer"),
])
def test_junk_in_place_of_a_pickle_is_one_line(tmp_path: Path, content: bytes, match: str) -> None:
    from radtrt.model.io import load_tensors

    path = tmp_path / "non_lora_trainables.bin"
    path.write_bytes(content)
    with pytest.raises(RadtrtError, match=match):
        load_tensors(path)


def test_every_model_preset_can_be_trained_from_scratch() -> None:
    from radtrt.training.init_model import ARCHS

    assert set(ARCHS) == set(PRESETS)
