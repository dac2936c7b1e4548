"""A trained checkpoint in the official release layout: same weights and tokens through both loaders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from radtrt.errors import RadtrtError
from radtrt.model.io import load_tensors
from radtrt.model.loading import load_model
from radtrt.runtime.backends import TorchBackend
from radtrt.runtime.pipeline import Pipeline
from radtrt.training.data import load_pixels_u8, normalize
from radtrt.training.release_export import export_release

from conftest import TinyRelease
from test_release_loading import _released_algorithm
from test_train_loop import Chain, chain, one_thread  # noqa: F401 - shared module fixtures


def _tokens(model_dir: Path, study: Path, base: Path | None = None) -> list[int]:
    loaded = load_model(model_dir, base)
    pipeline = Pipeline(TorchBackend(loaded.model), loaded.tokenizer, loaded.model.cfg)
    return pipeline.run(study, indication="Cough.", max_new_tokens=20).token_ids


def _study(chain: Chain) -> Path:
    return chain.manifest.parent / json.loads(chain.manifest.read_text().splitlines()[0])["image"]


@pytest.fixture(scope="module")
def exported(chain: Chain, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return export_release(chain.runs["stage2"], tmp_path_factory.mktemp("export") / "out")


def test_stage2_export_has_the_release_files(exported: tuple[Path, Path], chain: Chain) -> None:
    release, base = exported
    assert release.name == "llava-rad" and base.name == "base-lm"
    for name in ("config.json", "adapter_config.json", "adapter_model.bin", "non_lora_trainables.bin",
                 "biomedclipcxr_518.json", "biomedclipcxr_518_checkpoint.pt"):
        assert (release / name).is_file(), name
    assert {"config.json", "model.safetensors", "tokenizer.model"} <= {p.name for p in base.iterdir()}
    adapter = torch.load(release / "adapter_model.bin", weights_only=True)
    trained = load_tensors(chain.runs["stage2"] / "lora" / "adapter_model.safetensors")
    assert adapter.keys() == trained.keys() and all(torch.equal(adapter[k], trained[k]) for k in adapter)
    hf = json.loads((release / "config.json").read_text())
    assert hf["mm_projector_type"] == "mlp2x_gelu" and hf["model_type"] == "llava"


def test_release_reloads_with_identical_weights_and_tokens(exported: tuple[Path, Path], chain: Chain) -> None:
    release, base = exported
    merged = load_model(chain.runs["stage2"] / "model").model.state_dict()
    reloaded = load_model(release, base).model.state_dict()
    assert merged.keys() == reloaded.keys() and all(torch.equal(merged[k], reloaded[k]) for k in merged)
    study = _study(chain)
    assert _tokens(release, study, base) == _tokens(chain.runs["stage2"] / "model", study)


def test_released_loading_algorithm_agrees(exported: tuple[Path, Path], chain: Chain) -> None:
    """Hugging Face LLaMA + PeftModel merge + open_clip trunk, as LLaVA-Rad's builder.py loads it."""
    release, base = exported
    loaded = load_model(chain.runs["stage2"] / "model")
    cfg = loaded.model.cfg
    pixels = normalize(load_pixels_u8(_study(chain), cfg.vision.img_size)[None], cfg.image_mean, cfg.image_std)
    rel = TinyRelease(release, base, cfg, loaded.model, loaded.tokenizer, {})
    ours = _tokens(chain.runs["stage2"] / "model", _study(chain))
    assert _released_algorithm(rel, pixels, "Cough.", 20) == ours


def test_a_stage2_run_without_its_train_config_exports_its_lora(chain: Chain, tmp_path: Path) -> None:
    """RUN/train_config.json deleted: convert said "a training run folder, not a model: give RUN/model", and that
    exported an identity adapter over the merged decoder instead of the trained LoRA."""
    run = tmp_path / "run"
    shutil.copytree(chain.runs["stage2"], run)
    (run / "train_config.json").unlink()
    release, _ = export_release(run, tmp_path / "out")
    adapter = torch.load(release / "adapter_model.bin", weights_only=True)
    trained = load_tensors(run / "lora" / "adapter_model.safetensors")
    assert adapter.keys() == trained.keys() and all(torch.equal(adapter[k], trained[k]) for k in adapter)


def test_convert_of_a_run_folder_with_a_base_model_says_the_base_model_is_in_the_way(
        chain: Chain, tmp_path: Path, tiny_release: TinyRelease) -> None:
    """convert --to llava-rad takes a run folder, but with --base-model it said "RUN is a training run folder, not
    a model: give its model, RUN/model" (load_model's words), and RUN/model was then refused for --base-model."""
    from typer.testing import CliRunner

    from radtrt.cli import app

    def convert(*args: object) -> tuple[int, str]:
        result = CliRunner().invoke(app, ["convert", "--to", "llava-rad", *map(str, args)])
        return result.exit_code, result.stderr

    run = chain.runs["stage2"]
    code, err = convert("--model", run, "--base-model", tiny_release.base_dir, "-o", tmp_path / "out")
    assert code == 2 and not (tmp_path / "out").exists()
    assert f"{run} is a training run folder, whose model holds its whole decoder" in err
    assert f"drop --base-model {tiny_release.base_dir}" in err and "give its model" not in err
    code, err = convert("--model", run, "-o", tmp_path / "out")
    assert code == 0, err
    from radtrt.model.loading import load_model  # the next step, given the folder convert wrote, or half of it

    out = tmp_path / "out"
    with pytest.raises(RadtrtError, match=f"{out} holds the release layout 'radtrt convert --to llava-rad' writes: "
                                          f"give --model {out / 'llava-rad'} --base-model {out / 'base-lm'}$"):
        load_model(out)  # was "missing file: OUT/config.json"
    with pytest.raises(RadtrtError, match=f"pass --base-model with the base model written beside it, "
                                          f"{out / 'base-lm'}$"):
        load_model(out / "llava-rad")


def test_the_release_halves_mixed_up_are_told_apart(exported: tuple[Path, Path], tmp_path: Path) -> None:
    """--model OUT/base-lm was "neither a LLaVA-Rad release nor a radtrt model (run 'radtrt convert')", a loop,
    and --base-model OUT "missing file: OUT/config.json"; the suggested options were not quoted (a space)."""
    import shlex

    from typer.testing import CliRunner

    from radtrt.cli import app

    out = tmp_path / "sp ace" / "rel"
    shutil.copytree(exported[0].parent, out)
    halves = (f"give --model {shlex.quote(str(out / 'llava-rad'))} "
              f"--base-model {shlex.quote(str(out / 'base-lm'))}")
    assert "'" in halves
    with pytest.raises(RadtrtError) as refused:
        load_model(out)
    assert str(refused.value).endswith(halves)
    with pytest.raises(RadtrtError) as refused:
        load_model(out / "base-lm")
    assert str(refused.value) == (f"{out / 'base-lm'} is the base decoder of the release layout 'radtrt convert "
                                  f"--to llava-rad' writes, not a model by itself: {halves}")
    with pytest.raises(RadtrtError) as refused:
        load_model(out / "llava-rad", out)
    assert str(refused.value) == (f"--base-model {out} holds the release layout 'radtrt convert --to llava-rad' "
                                  f"writes, not a base language model: {halves}")
    result = CliRunner().invoke(app, ["convert", "--model", str(out / "base-lm"), "-o", str(tmp_path / "conv")])
    assert result.exit_code == 2 and halves in result.stderr.replace("\n", " ") and "run 'radtrt convert'" \
        not in result.stderr


def test_an_unfinished_run_is_sent_where_it_can_go(chain: Chain, tmp_path: Path) -> None:
    """A run without model/ was sent to resume, which had no checkpoint to resume from either."""
    run = tmp_path / "run"
    shutil.copytree(chain.runs["stage2"], run)
    shutil.rmtree(run / "model")
    with pytest.raises(RadtrtError, match=f"has not finished \\(no model/\\); resume it first; run: radtrt train "
                                          f"resume {run}$"):
        export_release(run, tmp_path / "out1")
    shutil.rmtree(run / "checkpoint")
    with pytest.raises(RadtrtError, match="has no checkpoint to resume from either: delete it and start the run again"):
        export_release(run, tmp_path / "out2")


def test_merged_model_exports_with_an_identity_adapter(chain: Chain, tmp_path: Path) -> None:
    release, base = export_release(chain.runs["stage1"], tmp_path / "out")
    adapter = torch.load(release / "adapter_model.bin", weights_only=True)
    assert adapter and not any(v.any() for v in adapter.values())
    a = load_model(chain.runs["stage1"] / "model").model.state_dict()
    b = load_model(release, base).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(RadtrtError, match="not empty"):
        export_release(chain.runs["stage1"], tmp_path / "out")


def test_a_release_loaded_with_another_base_is_refused(exported: tuple[Path, Path], tmp_path: Path) -> None:
    """Another base decoder of the same shape (another training's base-lm/) merged the adapter into the wrong
    weights with exit 0. The release names its base's weights; copies of the right base still load, a damaged one is
    named as damaged, and a release without the name (LLaVA-Rad's own) is not checked."""
    from safetensors.torch import load_file, save_file

    release, base = exported
    other = tmp_path / "other-base"
    shutil.copytree(base, other)
    weights = load_file(other / "model.safetensors")
    name = next(k for k in sorted(weights) if k.endswith("q_proj.weight"))
    weights[name] = weights[name] + 0.01
    save_file(weights, other / "model.safetensors")
    with pytest.raises(RadtrtError, match=f"--base-model {other} is not the base decoder {release} was written with"):
        load_model(release, other)
    # copies of the right base still load: float16, bfloat16 (not comparable exactly: not checked), and one an older
    # save left a rotary buffer in
    for kind, copy in (("half", lambda w: {k: v.half() for k, v in w.items()}),
                       ("bf16", lambda w: {k: v.bfloat16() for k, v in w.items()}),
                       ("rotary", lambda w: {**w, "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)})):
        copied = tmp_path / f"{kind}-base"
        shutil.copytree(base, copied)
        save_file(copy(load_file(copied / "model.safetensors")), copied / "model.safetensors")
        load_model(release, copied)
    # a wrong base with some tensors in bfloat16 is still checked on the others
    mixed = tmp_path / "mixed-base"
    shutil.copytree(other, mixed)
    weights = load_file(mixed / "model.safetensors")
    save_file({k: v.bfloat16() if k.endswith("norm.weight") else v for k, v in weights.items()},
              mixed / "model.safetensors")
    with pytest.raises(RadtrtError, match=f"--base-model {mixed} is not the base decoder"):
        load_model(release, mixed)
    # a damaged base is named as damaged, not as another base
    damaged = tmp_path / "damaged-base"
    shutil.copytree(base, damaged)
    save_file({k: v for k, v in load_file(damaged / "model.safetensors").items() if k != name},
              damaged / "model.safetensors")
    with pytest.raises(RadtrtError, match=f"base model {damaged} lacks the decoder weight '{name}'"):
        load_model(release, damaged)
    bare = tmp_path / "bare-release"
    shutil.copytree(release, bare)
    hf = json.loads((bare / "config.json").read_text())
    del hf["radtrt_base_weights_fingerprints"]
    (bare / "config.json").write_text(json.dumps(hf))
    load_model(bare, other)


def test_a_tied_embedding_model_converts_to_the_release_layout_and_back(tmp_path: Path) -> None:
    """Its base-lm held lm_head and embed_tokens as one tensor, which safetensors refuses ("Some tensors share
    memory", exit 2): the tied head is left out, as Hugging Face saves one, and comes back tied."""
    import dataclasses

    from radtrt.model.config import preset
    from radtrt.model.loading import LoadedModel
    from radtrt.model.tiny import random_model, train_tiny_tokenizer

    cfg = preset("tiny")
    cfg = dataclasses.replace(cfg, decoder=dataclasses.replace(cfg.decoder, tie_word_embeddings=True))
    model = random_model(cfg)
    release, base = export_release(LoadedModel(model, train_tiny_tokenizer(), "tied"), tmp_path / "out")
    assert "lm_head.weight" not in load_tensors(base / "model.safetensors")
    reloaded = load_model(release, base).model.state_dict()
    assert all(torch.equal(v, reloaded[k]) for k, v in model.state_dict().items())


def test_export_refuses_a_changed_base(chain: Chain, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(chain.runs["stage2"], run)
    cfg = json.loads((run / "train_config.json").read_text())
    cfg["init_model"] = str(chain.init)  # not the model stage 2 started from
    (run / "train_config.json").write_text(json.dumps(cfg))
    with pytest.raises(RadtrtError, match="is not the one"):
        export_release(run, tmp_path / "out")


@pytest.mark.parametrize("failure", [
    RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file data/0: "
                 "file write failed"),
    OSError(28, "No space left on device"),
])
def test_a_release_that_cannot_be_written_is_one_line(chain: Chain, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      failure: Exception) -> None:
    """torch.save on a full disk raised its C++ writer's RuntimeError as a traceback."""
    from radtrt.model import release

    def full_disk(*_args: object, **_kwargs: object) -> None:
        raise failure

    monkeypatch.setattr(release.torch, "save", full_disk)
    # the disk's free space named: the zip writer's own words ("unexpected pos 8128 vs 8016") say nothing of it
    with pytest.raises(RadtrtError, match=r"cannot write release folder .*(file write failed|No space left on device); \d+ MB "
                                          r"free there\)$"):
        export_release(chain.runs["stage1"] / "model", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_a_base_lm_that_cannot_be_written_is_one_line(chain: Chain, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from radtrt.model.release import write_base_lm
    from radtrt.model.tokenizer import LlamaSPTokenizer

    def full_disk(self: object, directory: Path) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(LlamaSPTokenizer, "save", full_disk)
    loaded = load_model(chain.runs["stage1"] / "model")
    with pytest.raises(RadtrtError, match="cannot write base-LM folder .*No space left on device"):
        write_base_lm(tmp_path / "base", loaded.model.cfg, loaded.model.language_model.state_dict(), loaded.tokenizer)


def test_the_prompt_template_survives_the_release_round_trip(chain: Chain, tmp_path: Path,
                                                            tiny_release: TinyRelease) -> None:
    """A stage-1 model (plain) came back as v1 from release -> radtrt: bit-identical weights, other tokens."""
    release, base = export_release(chain.runs["stage1"] / "model", tmp_path / "out")
    assert load_model(release, base).model.cfg.conv_template == "plain"
    study = _study(chain)
    assert _tokens(release, study, base) == _tokens(chain.runs["stage1"] / "model", study)
    assert load_model(tiny_release.release_dir, tiny_release.base_dir).model.cfg.conv_template == "v1"
    official = json.loads((tiny_release.release_dir / "config.json").read_text())
    official.pop("radtrt_conv_template", None)  # LLaVA-Rad's own config.json has no such key
    (tmp_path / "official").mkdir()
    for f in tiny_release.release_dir.iterdir():
        shutil.copy(f, tmp_path / "official" / f.name)
    (tmp_path / "official" / "config.json").write_text(json.dumps(official))
    assert load_model(tmp_path / "official", tiny_release.base_dir).model.cfg.conv_template == "v1"
    official["radtrt_conv_template"] = "chatml"
    (tmp_path / "official" / "config.json").write_text(json.dumps(official))
    with pytest.raises(RadtrtError, match="radtrt_conv_template 'chatml' is not a conversation template"):
        load_model(tmp_path / "official", tiny_release.base_dir)
