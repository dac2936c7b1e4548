"""The training stages on a tiny model and a handful of phantoms: what trains, loss, exact resume, outputs."""

from __future__ import annotations

import json
import os
import re
import shlex
from dataclasses import dataclass
from typing import Any, Callable
from pathlib import Path

import pytest
import torch

from radtrt.data.manifest import read_manifest
from radtrt.data.phantom_set import write_phantom_set
from radtrt.errors import RadtrtError
from radtrt.model.io import load_tensors
from radtrt.model.loading import load_model, save_toolkit
from radtrt.training.checkpoint import load_checkpoint
from radtrt.training.config import make_config
from radtrt.training.init_model import fresh_model
from radtrt.training.loop import _quiet_on_sigterm, read_log, train
from radtrt.training.objectives import build_objective, trainable_parameters
from radtrt.training.tokenizer import train_tokenizer

from conftest import TinyRelease


@dataclass
class Chain:
    manifest: Path
    init: Path
    runs: dict[str, Path]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> None:
    """Small ops are much faster single-threaded, and the CI machine's 2 cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run_stage(stage: str, manifest: Path, init: Path, out: Path, **overrides: object) -> Path:
    cfg = make_config(stage, "tiny", manifest=str(manifest), init_model=str(init), out_dir=str(out), **overrides)
    result = train(cfg)
    assert result.model_dir is not None
    return out


STAGES = ("vision", "lm", "stage1", "stage2")


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Chain:
    """Phantoms -> tokenizer -> init -> the four stages, built once per session (other modules import it)."""
    root = tmp_path_factory.getbasetemp() / "train-chain"
    runs = {stage: root / stage for stage in STAGES}
    manifest, init = root / "phantoms" / "manifest.jsonl", root / "init"
    if (runs["stage2"] / "model" / "config.json").is_file():
        return Chain(manifest, init, runs)
    write_phantom_set(root / "phantoms", 16, seed=11, rows=72, cols=64, formats=("png",))
    save_toolkit(fresh_model("tiny", train_tokenizer(read_manifest(manifest), 400)), init)
    previous = init
    for stage in STAGES:
        run_stage(stage, manifest, previous, runs[stage], max_steps=12)  # 3 epochs of 4 steps
        previous = runs[stage] / "model"
    return Chain(manifest, init, runs)


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


@pytest.mark.parametrize("stage", ["vision", "lm", "stage1", "stage2"])
def test_each_stage_lowers_the_loss(chain: Chain, stage: str) -> None:
    """Mean loss over the last epoch below the first epoch's (every epoch sees every phantom once)."""
    losses = [entry["loss"] for entry in read_log(chain.runs[stage])]
    assert len(losses) == 12 and all(torch.isfinite(torch.tensor(losses)))
    assert _mean(losses[-4:]) < _mean(losses[:4]), losses


def test_each_stage_trains_only_its_parameters(chain: Chain) -> None:
    def names(stage: str) -> set[str]:
        cfg = make_config(stage, "tiny", manifest=str(chain.manifest), init_model=str(chain.init), out_dir="unused")
        objective, _ = build_objective(cfg, load_model(chain.init).model, ["cardiomegaly"])
        return {n for n, _ in trainable_parameters(objective)}

    vision, lm, stage1, stage2 = (names(s) for s in ("vision", "lm", "stage1", "stage2"))
    assert vision and all(n.startswith(("llava.vision_tower.blocks.0.", "llava.vision_tower.blocks.1.", "head.",
                                        "llava.vision_tower.patch_embed", "llava.vision_tower.pos_embed",
                                        "llava.vision_tower.cls_token")) for n in vision)  # block 2 of 3 unused
    assert lm and all(n.startswith("llava.language_model.") for n in lm)
    assert stage1 == {f"llava.mm_projector.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")}
    lora = stage2 - stage1
    assert stage1 < stage2 and all(".lora_A." in n or ".lora_B." in n for n in lora)
    assert {n.split(".lora_")[0].rsplit(".", 1)[1] for n in lora} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_weight_decay_spares_every_1d_parameter_layerscale_included() -> None:
    """The help said 'not on biases and norms' while LayerScale gammas were spared too (timm's rule, kept: decaying
    them towards 0 shrinks the trunk's blocks); the groups are pinned here to what the help now says."""
    from radtrt.model.config import preset
    from radtrt.model.tiny import random_model
    from radtrt.training.loop import _optimizer

    model = random_model(preset("tiny"))
    named = list(model.vision_tower.named_parameters())
    cfg = make_config("vision", "tiny", manifest=".", init_model=".", out_dir=".", weight_decay=0.05)
    decay, spared = _optimizer(named, cfg).param_groups
    assert decay["weight_decay"] == 0.05 and spared["weight_decay"] == 0.0
    names = {id(p): n for n, p in named}
    spared_names = {names[id(p)] for p in spared["params"]}
    assert any(n.endswith("ls1.gamma") for n in spared_names) and any(n.endswith(".bias") for n in spared_names)
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in spared["params"])


def test_stage_outputs(chain: Chain) -> None:
    s1, s2 = load_model(chain.runs["stage1"] / "model"), load_model(chain.runs["stage2"] / "model")
    assert s1.model.cfg.conv_template == "plain" and s2.model.cfg.conv_template == "v1"
    base = load_model(chain.runs["stage1"] / "model").model.state_dict()
    after = s2.model.state_dict()
    assert torch.equal(base["vision_tower.blocks.0.attn.qkv.weight"], after["vision_tower.blocks.0.attn.qkv.weight"])
    assert not torch.equal(base["mm_projector.0.weight"], after["mm_projector.0.weight"])
    assert not torch.equal(base["language_model.model.layers.0.mlp.up_proj.weight"],
                           after["language_model.model.layers.0.mlp.up_proj.weight"])  # LoRA merged in
    assert torch.equal(base["language_model.lm_head.weight"], after["language_model.lm_head.weight"])
    adapter = load_tensors(chain.runs["stage2"] / "lora" / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in adapter
    head = json.loads((chain.runs["vision"] / "vision_head.json").read_text())
    assert "no_finding" in head["labels"]
    state = load_checkpoint(chain.runs["stage2"])
    assert state["step"] == 12 and state["world_size"] == 1 and state["config"]["stage"] == "stage2"


def test_resume_reproduces_the_uninterrupted_run(chain: Chain, tmp_path: Path) -> None:
    overrides = dict(max_steps=6, save_every=100, lora_dropout=0.3)  # dropout: the RNG state must come back too
    full = run_stage("stage2", chain.manifest, chain.runs["stage1"] / "model", tmp_path / "full", **overrides)
    cfg = make_config("stage2", "tiny", manifest=str(chain.manifest), init_model=str(chain.runs["stage1"] / "model"),
                      out_dir=str(tmp_path / "split"), **overrides)
    first = train(cfg, stop_after=3)
    assert first.model_dir is None and first.step == 3 and load_checkpoint(tmp_path / "split")["step"] == 3
    with open(tmp_path / "split" / "log.jsonl", "a") as log:  # a step the killed run logged but never saved
        log.write(json.dumps({"step": 4, "loss": 123.0}) + "\n")
        log.write('{"step": 5, "lo')  # killed while appending: a cut last line
    with pytest.raises(RadtrtError, match="already holds a training run"):
        train(cfg)
    second = train(cfg, resume=True)
    assert second.model_dir is not None
    with pytest.raises(RadtrtError, match="already holds a trained model; choose another -o"):  # not "resume it"
        train(cfg)
    assert [e["loss"] for e in read_log(tmp_path / "split")] == [e["loss"] for e in read_log(full)]
    a = load_tensors(full / "model" / "model.safetensors")
    b = load_tensors(tmp_path / "split" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_copied_run_resumes_where_it_is_now(chain: Chain, tmp_path: Path) -> None:
    """resume writes into the folder it was given, never into the one the run started in (stored in its
    checkpoint), which may hold another run or be gone."""
    import shutil

    from radtrt.training.loop import resume_config

    cfg = make_config("stage2", "tiny", manifest=str(chain.manifest), init_model=str(chain.runs["stage1"] / "model"),
                      out_dir=str(tmp_path / "original"), max_steps=4, save_every=100)
    train(cfg, stop_after=2)
    shutil.copytree(tmp_path / "original", tmp_path / "copy")
    before = (tmp_path / "original" / "checkpoint" / "state.pt").read_bytes()
    assert resume_config(tmp_path / "copy").out_dir == str(tmp_path / "copy")
    result = train(resume_config(tmp_path / "copy"), resume=True)
    assert result.model_dir == tmp_path / "copy" / "model"
    assert not (tmp_path / "original" / "model").exists()
    assert (tmp_path / "original" / "checkpoint" / "state.pt").read_bytes() == before
    (tmp_path / "original" / "checkpoint" / "state.pt").write_bytes(b"")  # an empty checkpoint: one line
    with pytest.raises(RadtrtError, match="corrupt or not radtrt's"):
        resume_config(tmp_path / "original")


def _damage_state(key: str, value: object) -> Callable[[Path], None]:
    def damage(run: Path) -> None:
        state = load_checkpoint(run)
        if value is None:
            del state[key]
        else:
            state[key] = value(state[key]) if callable(value) else value
        torch.save(state, run / "checkpoint" / "state.pt")
    return damage


def _first_tensor_wrong_shape(trainable: dict) -> dict:
    return {**trainable, next(iter(trainable)): torch.zeros(3)}


def _flip_a_bit_in_a_tensor(run: Path) -> None:
    """One bit of a stored tensor: torch.load accepted it and the resume trained a damaged model, exit 0."""
    import zipfile

    path = run / "checkpoint" / "state.pt"
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        record = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
        payload = archive.read(record)
    at = raw.find(payload[:64]) + len(payload) // 2
    raw[at] ^= 0x04
    path.write_bytes(bytes(raw))


def _flip_a_byte_in_a_pickled_string(run: Path) -> None:
    """A damaged byte in data.pkl, with checksums that still agree (rewritten): a UnicodeDecodeError traceback."""
    import zipfile

    path = run / "checkpoint" / "state.pt"
    with zipfile.ZipFile(path) as src:
        records = [(i.filename, src.read(i)) for i in src.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as dst:
        for name, data in records:
            dst.writestr(name, data.replace(b"radtrt-train-state-1", b"\xffadtrt-train-state-1")
                         if name.endswith("data.pkl") else data)


@pytest.mark.parametrize("damage, message", [
    (_damage_state("optimizer", None), "has no valid 'optimizer'"),
    (_damage_state("step", "3"), "has no valid 'step'"),
    (_damage_state("rng", []), "damaged training state \\(IndexError"),
    (_damage_state("optimizer", {"state": {}}), "damaged training state \\(KeyError"),
    # a weight of another shape (another model, another LoRA rank) is named with both shapes, not "damaged"
    (_damage_state("trainable", _first_tensor_wrong_shape),
     "does not match this stage's trainable weights \\(.*: \\(.*\\) in the checkpoint, \\(.*\\) in the model\\)"),
    (lambda run: (run / "log.jsonl").write_text("garbage\n" + (run / "log.jsonl").read_text()),
     "log.jsonl line 1 is not a training log entry"),
    (lambda run: (run / "model").write_text("x"), "model folder .* is not a folder"),  # found after the last step
    (_damage_state("config", lambda c: {k: v for k, v in c.items() if k != "lora_r"}),
     "training config in .*state.pt is incomplete: it lacks lora_r"),  # took the default, then failed elsewhere
    (_damage_state("config", lambda c: {**c, "lr": float("nan")}),  # said without naming the checkpoint
     "training config in .*state.pt is malformed \\(lr must be a finite number, got nan\\)"),
    # the record as the archive names it, not under the temporary name the file was written through
    (_flip_a_bit_in_a_tensor, "state.pt is corrupt: its record data/\\d+ fails its checksum"),
    (_flip_a_byte_in_a_pickled_string, "state.pt is corrupt or not radtrt's \\(UnicodeDecodeError"),
])
def test_a_damaged_run_is_refused_before_resuming(chain: Chain, tmp_path: Path, damage: Callable[[Path], None],
                                                  message: str) -> None:
    import shutil

    from radtrt.training.loop import resume_config

    base = tmp_path.parent / "damage-base"  # one interrupted run shared by the cases
    if not (base / "checkpoint" / "state.pt").is_file():
        train(make_config("stage1", "tiny", manifest=str(chain.manifest), init_model=str(chain.runs["lm"] / "model"),
                          out_dir=str(base), max_steps=4), stop_after=2)
    run = tmp_path / "run"
    shutil.copytree(base, run)
    damage(run)
    log_before = (run / "log.jsonl").read_text()
    with pytest.raises(RadtrtError, match=message):
        train(resume_config(run), resume=True)
    assert (run / "log.jsonl").read_text() == log_before and load_checkpoint(base)["step"] == 2


def test_batch_larger_than_data_is_refused(chain: Chain, tmp_path: Path) -> None:
    with pytest.raises(RadtrtError, match="fewer than one global batch"):
        run_stage("lm", chain.manifest, chain.init, tmp_path / "big", micro_batch_size=64)


def test_bf16_autocast_trains(chain: Chain, tmp_path: Path) -> None:
    run = run_stage("stage2", chain.manifest, chain.runs["stage1"] / "model", tmp_path / "bf16", max_steps=2,
                    precision="bf16")
    losses = [e["loss"] for e in read_log(run)]
    assert len(losses) == 2 and all(0.0 < x < 20.0 for x in losses)
    assert load_model(run / "model").model.dtype == torch.float32  # autocast: weights stay fp32


def test_a_run_stopped_while_writing_its_model_is_finished_by_resume(chain: Chain, tmp_path: Path) -> None:
    """All steps saved, the model not yet written (killed, or a full disk): resume said 'nothing to resume' and
    the trained weights could never be written."""
    import shutil

    from radtrt.training.loop import resume_config

    run = run_stage("stage2", chain.manifest, chain.runs["stage1"] / "model", tmp_path / "run", max_steps=3)
    written = load_tensors(run / "model" / "model.safetensors")
    adapter = (run / "lora" / "adapter_model.safetensors").read_bytes()
    with pytest.raises(RadtrtError, match="has finished all 3 steps and written its model; nothing to resume"):
        train(resume_config(run), resume=True)
    shutil.rmtree(run / "model")
    result = train(resume_config(run), resume=True)  # no step runs: the outputs are written from the checkpoint
    assert result.model_dir == run / "model" and [e["step"] for e in read_log(run)] == [1, 2, 3]
    again = load_tensors(run / "model" / "model.safetensors")
    assert all(torch.equal(written[k], again[k]) for k in written)
    assert (run / "lora" / "adapter_model.safetensors").read_bytes() == adapter


def test_resume_refuses_a_checkpoint_folder_that_links_to_another_run(chain: Chain, tmp_path: Path) -> None:
    """A run folder whose checkpoint/ was a link to another run's resumed, and saved its steps into that other
    run's checkpoint, overwriting the state it would resume from."""
    import shutil

    from radtrt.training.loop import resume_config

    cfg = make_config("stage2", "tiny", manifest=str(chain.manifest), init_model=str(chain.runs["stage1"] / "model"),
                      out_dir=str(tmp_path / "original"), max_steps=4, save_every=1)
    train(cfg, stop_after=2)
    linked = tmp_path / "linked"
    linked.mkdir()
    shutil.copy(tmp_path / "original" / "train_config.json", linked)
    (linked / "checkpoint").symlink_to(tmp_path / "original" / "checkpoint")
    with pytest.raises(RadtrtError, match=r"checkpoint is a link to .*original/checkpoint: resume would write its "
                                          r"checkpoints there, into another run's folder; copy the folder"):
        resume_config(linked)
    (linked / "checkpoint").unlink()
    shutil.copytree(tmp_path / "original" / "checkpoint", linked / "checkpoint")
    assert resume_config(linked).out_dir == str(linked)


def test_resume_of_a_finished_run_says_so_before_loading_anything(chain: Chain) -> None:
    """It loaded the model and read every image, then said 'nothing to resume'."""
    from radtrt.training.loop import resume_config

    run = chain.runs["stage1"]
    with pytest.raises(RadtrtError, match=f"{run} has finished all 12 steps and written its model; nothing to "
                                          f"resume$"):
        resume_config(run)


def test_resume_refuses_another_init_model_or_manifest(chain: Chain, tmp_path: Path) -> None:
    """The checkpoint holds only the trainable weights and the data's position: a frozen model or manifest
    changed in between continued silently on other weights or other data."""
    import shutil

    from radtrt.training.loop import resume_config

    init, manifest = tmp_path / "init", tmp_path / "data" / "manifest.jsonl"
    shutil.copytree(chain.runs["stage1"] / "model", init)
    shutil.copytree(chain.manifest.parent, manifest.parent)
    cfg = make_config("stage2", "tiny", manifest=str(manifest), init_model=str(init), out_dir=str(tmp_path / "run"),
                      max_steps=4, save_every=1)
    train(cfg, stop_after=2)
    rows = manifest.read_text().splitlines()
    manifest.write_text("\n".join(rows[1:] + rows[:1]) + "\n")  # the same studies in another order
    with pytest.raises(RadtrtError, match="manifest .* has changed since"):
        train(resume_config(tmp_path / "run"), resume=True)
    manifest.write_text("\n".join(rows) + "\n")
    shutil.rmtree(init)
    save_toolkit(fresh_model("tiny", load_model(chain.runs["stage1"] / "model").tokenizer, seed=5), init)
    with pytest.raises(RadtrtError, match="--model .* has changed since"):
        train(resume_config(tmp_path / "run"), resume=True)
    from radtrt.training import checkpoint as ckpt

    state = ckpt.load_checkpoint(tmp_path / "run")
    del state["origin"]  # leaving the record out skipped these checks
    ckpt.save_checkpoint(tmp_path / "run", state)
    with pytest.raises(RadtrtError, match="does not record what the run started from"):
        train(resume_config(tmp_path / "run"), resume=True)


@pytest.mark.parametrize("lazy", [False, True], ids=["preloaded", "read-by-workers"])
def test_resume_refuses_other_images_under_the_same_manifest(chain: Chain, tmp_path: Path, lazy: bool) -> None:
    """PNGs overwritten in place, the manifest untouched: the 'exact continuation' trained on other images."""
    import shutil

    from radtrt.training import checkpoint as ckpt
    from radtrt.training.loop import resume_config

    data = tmp_path / "data"
    shutil.copytree(chain.manifest.parent, data)
    run = tmp_path / "run"
    cfg = make_config("stage1", "tiny", manifest=str(data / "manifest.jsonl"),
                      init_model=str(chain.runs["lm"] / "model"), out_dir=str(run), max_steps=4, save_every=1,
                      **(dict(num_workers=1, cache_features=False) if lazy else {}))
    train(cfg, stop_after=2)
    first = data / json.loads((data / "manifest.jsonl").read_text().splitlines()[0])["image"]
    shutil.copyfile(data / "png" / "phantom-00001.png", first)
    with pytest.raises(RadtrtError, match="the image data of manifest .*manifest.jsonl \\(the manifest itself is "
                                          "unchanged\\) has changed since .*run started"):
        train(resume_config(run), resume=True)
    state = ckpt.load_checkpoint(run)
    del state["origin"]["images_sha256"]  # saved before the images were recorded: resumed unchecked, as before
    ckpt.save_checkpoint(run, state)
    assert train(resume_config(run), resume=True).model_dir is not None


def test_resume_refuses_a_checkpoint_that_disagrees_with_the_run_config(chain: Chain, tmp_path: Path) -> None:
    """resume continued whatever RUN/checkpoint/state.pt held (another run's, another stage's), ignored an edited
    train_config.json, and never wrote back a deleted one."""
    import shutil

    from radtrt.training.loop import resume_config

    run = tmp_path / "run"
    train(make_config("stage2", "tiny", manifest=str(chain.manifest), init_model=str(chain.runs["stage1"] / "model"),
                      out_dir=str(run), max_steps=4, save_every=1), stop_after=2)
    config_file, state = run / "train_config.json", run / "checkpoint" / "state.pt"
    written = config_file.read_text()
    config_file.write_text(json.dumps({**json.loads(written), "lr": 0.5}))  # edited, believed to take effect
    with pytest.raises(RadtrtError, match=f"{config_file} disagrees with the checkpoint {state} \\(lr: 0.5 in the "
                                          f"file, 0.003 in the checkpoint\\): the checkpoint is another run's, or "
                                          f"the file was edited"):
        resume_config(run)
    config_file.write_text(written)
    ours = state.read_bytes()
    shutil.copyfile(chain.runs["stage1"] / "checkpoint" / "state.pt", state)  # another run's, another stage's
    with pytest.raises(RadtrtError, match="disagrees with the checkpoint .*\\(init_model: "):
        resume_config(run)
    state.write_bytes(ours)
    config_file.write_text(written[:50])  # cut short: the remedy is the one a deleted file has
    with pytest.raises(RadtrtError, match=f"is not valid JSON .*; to write it again from the checkpoint, delete it, "
                                          f"then run: radtrt train resume {run}$"):
        resume_config(run)
    config_file.unlink()  # written again from the checkpoint
    cfg = resume_config(run)
    assert json.loads(config_file.read_text()) == json.loads(written)
    assert train(cfg, resume=True).model_dir == run / "model"


def test_resume_refuses_a_model_partial_in_the_way_before_training(chain: Chain, tmp_path: Path) -> None:
    """A user's RUN/model.partial was found after every remaining step ("move it or choose another -o": resume
    takes no -o)."""
    from radtrt.training.loop import resume_config

    run = tmp_path / "run"
    train(make_config("stage1", "tiny", manifest=str(chain.manifest), init_model=str(chain.runs["lm"] / "model"),
                      out_dir=str(run), max_steps=4, save_every=1), stop_after=2)
    (run / "model.partial").mkdir()
    (run / "model.partial" / "notes.txt").write_text("mine")
    with pytest.raises(RadtrtError, match=f"{run}/model.partial is in the way of the model this run ends with .* "
                                          f"move it away, then run: radtrt train resume {run}$"):
        train(resume_config(run), resume=True)
    assert [e["step"] for e in read_log(run)] == [1, 2] and load_checkpoint(run)["step"] == 2


def test_resume_removes_only_the_lora_folder_it_wrote(chain: Chain, tmp_path: Path) -> None:
    """A run stopped between writing RUN/lora and RUN/model: resume deleted lora/ with rmtree, whatever was in it."""
    import shutil

    from radtrt.training.loop import resume_config

    run = run_stage("stage2", chain.manifest, chain.runs["stage1"] / "model", tmp_path / "run", max_steps=2)
    adapter = (run / "lora" / "adapter_model.safetensors").read_bytes()
    shutil.rmtree(run / "model")
    (run / "lora" / "notes.txt").write_text("mine")
    with pytest.raises(RadtrtError, match=f"{run}/lora holds notes.txt, which radtrt did not write; it is in the way "
                                          f"of the LoRA adapter this run writes: move it away, then run: radtrt "
                                          f"train resume {run}$"):
        train(resume_config(run), resume=True)
    assert (run / "lora" / "notes.txt").read_text() == "mine"
    (run / "lora" / "notes.txt").unlink()
    (run / "lora" / ".DS_Store").write_bytes(b"\0")  # Finder's, from a look inside: no reason to refuse
    assert train(resume_config(run), resume=True).model_dir == run / "model"
    assert sorted(p.name for p in (run / "lora").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert (run / "lora" / "adapter_model.safetensors").read_bytes() == adapter


def test_a_stage2_run_stopped_between_its_lora_and_its_model_leaves_no_lora(chain: Chain, tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """RUN/lora is what a finished stage-2 run holds; one interrupted while writing RUN/model left it, and a script
    checking for it took the run for finished. The resume writes both."""
    from radtrt.training import outputs
    from radtrt.training.loop import resume_config

    def interrupted(*_: object, **__: object) -> Path:
        raise KeyboardInterrupt

    run = tmp_path / "run"
    monkeypatch.setattr(outputs, "save_toolkit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_stage("stage2", chain.manifest, chain.runs["stage1"] / "model", run, max_steps=2)
    assert not (run / "lora").exists() and not (run / "model").exists()
    monkeypatch.undo()
    assert train(resume_config(run), resume=True).model_dir == run / "model" and (run / "lora").is_dir()


@pytest.mark.parametrize("step, max_steps", [(-3, 6), (100, 6), (2, 1)])
def test_a_checkpoint_at_a_step_outside_its_run_is_refused(chain: Chain, tmp_path: Path, step: int,
                                                          max_steps: int) -> None:
    """step -3 trained 9 steps of 6; step 100 of 6 wrote a 2-step model as finished; max_steps 1 at step 2 showed
    '2/1'."""
    from radtrt.training import checkpoint as ckpt
    from radtrt.training.loop import resume_config

    run = tmp_path / "run"
    train(make_config("stage1", "tiny", manifest=str(chain.manifest), init_model=str(chain.runs["lm"] / "model"),
                      out_dir=str(run), max_steps=6, save_every=1), stop_after=2)
    state = ckpt.load_checkpoint(run)
    state["step"], state["config"]["max_steps"] = step, max_steps
    ckpt.save_checkpoint(run, state)
    (run / "train_config.json").unlink()  # written again from the checkpoint, which it would disagree with
    with pytest.raises(RadtrtError, match=f"training checkpoint {run}/checkpoint/state.pt is damaged: it is at step "
                                          f"{step}, outside its run's 0 to {max_steps} steps"):
        train(resume_config(run), resume=True)
    assert not (run / "model").exists()


def _lazy_stage1(chain: Chain, data: Path, run: Path) -> object:
    return make_config("stage1", "tiny", manifest=str(data / "manifest.jsonl"),
                       init_model=str(chain.runs["lm"] / "model"), out_dir=str(run), max_steps=4, save_every=1,
                       num_workers=1, cache_features=False)


def test_an_unreadable_image_is_refused_before_a_lazily_read_run_starts(chain: Chain, tmp_path: Path) -> None:
    """--num-workers N --no-feature-cache: a PNG signature before garbage failed the run mid-way, after its
    checkpoints, and the repaired image then made resume refuse the run (its images changed)."""
    import shutil

    data, run = tmp_path / "data", tmp_path / "run"
    shutil.copytree(chain.manifest.parent, data)
    first = data / json.loads((data / "manifest.jsonl").read_text().splitlines()[0])["image"]
    first.write_bytes(b"\x89PNG\r\n\x1a\n" + b"x" * 50)
    # named by its manifest line, not its path (which may carry a patient's name)
    with pytest.raises(RadtrtError, match=f"^{data / 'manifest.jsonl'}:1 \\(its image\\): image data is truncated or "
                                          f"corrupt$"):
        train(_lazy_stage1(chain, data, run))
    assert not run.exists()


def test_a_rows_image_is_named_by_its_line_not_its_path(chain: Chain, tmp_path: Path) -> None:
    """'manifest image not found: dicom/nope/Doe_Johnathan.dcm', '.../Doe_Johnathan_MRN998877: frontal.dcm: ...':
    an image's path may carry a patient's name; the non-frontal warning already named the line."""
    import shutil

    data, run = tmp_path / "data", tmp_path / "run"
    shutil.copytree(chain.manifest.parent, data)
    lines = (data / "manifest.jsonl").read_text().splitlines()
    row = json.loads(lines[1])
    row["image"] = "dicom/Doe_Johnathan_MRN998877/frontal.dcm"
    (data / "manifest.jsonl").write_text("\n".join([lines[0], json.dumps(row), *lines[2:]]) + "\n")
    cfg = make_config("stage1", "tiny", manifest=str(data / "manifest.jsonl"),
                      init_model=str(chain.runs["lm"] / "model"), out_dir=str(run), max_steps=2)
    with pytest.raises(RadtrtError, match=f"^{data / 'manifest.jsonl'}:2: its image is not found") as missing:
        train(cfg)
    folder = data / "dicom" / "Doe_Johnathan_MRN998877"
    folder.mkdir(parents=True)
    (folder / "frontal.dcm").write_bytes(b"not an image")
    with pytest.raises(RadtrtError, match=f"^{data / 'manifest.jsonl'}:2 \\(its image\\): ") as unreadable:
        train(cfg)
    assert "Doe" not in str(missing.value) + str(unreadable.value) and not run.exists()


def test_an_image_that_fails_mid_run_says_the_run_must_start_again(chain: Chain, tmp_path: Path) -> None:
    """Damaged pixel data under a good header is found only when a worker reads it; resume would refuse the run
    once the image is repaired, so the error says to start again (and to resume when only access was lost)."""
    import shutil

    data, run = tmp_path / "data", tmp_path / "run"
    shutil.copytree(chain.manifest.parent, data)
    first = data / json.loads((data / "manifest.jsonl").read_text().splitlines()[0])["image"]
    first.write_bytes(first.read_bytes()[:60])  # the signature and header chunk, the pixel data cut
    with pytest.raises(RadtrtError, match=f"{data / 'manifest.jsonl'}:1 \\(its image\\): image data is truncated or "
                                          f"corrupt; if its bytes must be "
                                          f"repaired, resume refuses .*: start the run again \\(delete {run} or "
                                          f"choose another -o\\); if the file was only out of reach .*, then run: "
                                          f"radtrt train resume {run}$"):
        train(_lazy_stage1(chain, data, run))


def test_an_image_that_fails_before_the_first_checkpoint_says_to_start_again(chain: Chain, tmp_path: Path) -> None:
    """The message named 'radtrt train resume RUN', which then refused the run: it had stopped before its first
    checkpoint."""
    import shutil

    from radtrt.training.loop import resume_config

    data, run = tmp_path / "data", tmp_path / "run"
    shutil.copytree(chain.manifest.parent, data)
    # row 12 is in the first step's first micro-batch (seed 0, 16 rows, 4 a step)
    image = data / json.loads((data / "manifest.jsonl").read_text().splitlines()[12])["image"]
    image.write_bytes(image.read_bytes()[:60])
    cfg = make_config("stage1", "tiny", manifest=str(data / "manifest.jsonl"),
                      init_model=str(chain.runs["lm"] / "model"), out_dir=str(run), max_steps=4, save_every=2,
                      num_workers=1, cache_features=False)
    with pytest.raises(RadtrtError) as failed:
        train(cfg)
    assert str(failed.value) == (
        f"{data / 'manifest.jsonl'}:13 (its image): image data is truncated or corrupt; the run stopped before its "
        f"first checkpoint; so there is nothing to resume: {run}, which this run had created, was removed; once that "
        f"is fixed, run the training command again")
    assert not run.exists()  # a rerun found the folder holding the run's config and log, and refused it
    with pytest.raises(RadtrtError, match="no training checkpoint|does not exist|not found"):
        resume_config(run)


def _with_views(chain: Chain, data: Path, views: dict[int, str]) -> Path:
    """A copy of the chain's phantoms whose rows ``views`` name a DICOM of that view, after a blank first line."""
    import shutil

    from radtrt.imaging.synthetic import radiograph_dataset, synthetic_chest

    shutil.copytree(chain.manifest.parent, data)
    rows = [json.loads(line) for line in (data / "manifest.jsonl").read_text().splitlines()]
    for index, view in views.items():
        radiograph_dataset(synthetic_chest(rows=72, cols=64, seed=index), view_position=view).save_as(
            data / f"row{index}.dcm", enforce_file_format=True)
        rows[index]["image"] = f"row{index}.dcm"
    (data / "manifest.jsonl").write_text("\n" + "".join(json.dumps(row) + "\n" for row in rows))
    return data / "manifest.jsonl"


@pytest.mark.parametrize("lazy", [False, True])
def test_training_on_views_that_are_not_frontal_is_warned_about_once(chain: Chain, tmp_path: Path, lazy: bool,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """A lateral in a manifest row trained without a word (infer calls a report on one unreliable)."""
    manifest = _with_views(chain, tmp_path / "data", {2: "PA", 5: "LL", 9: "RL"})
    cfg = make_config("stage1", "tiny", manifest=str(manifest), init_model=str(chain.runs["lm"] / "model"),
                      out_dir=str(tmp_path / "run"), max_steps=1, num_workers=1 if lazy else 0,
                      cache_features=not lazy)  # lazy: screened by headers, read by a DataLoader worker
    train(cfg)
    err = capsys.readouterr().err
    warning = (f"radtrt: warning: 2 manifest rows are not a frontal (PA/AP) view (first: {manifest}:7, a LL view); "
               f"LLaVA-Rad trains and reports on frontal radiographs, and infer calls a report on any other view "
               f"unreliable")
    assert err.count(warning) == 1, err
    assert "row5.dcm" not in err and "row9.dcm" not in err


def test_rows_cut_to_max_length_and_repeated_rows_are_warned_about_once(chain: Chain, tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """A report longer than --max-length was cut without a word (its end and EOS untrained: the model learns no
    stop there), and a manifest concatenated twice trained every row twice, silently."""
    import shutil

    data = Path(shutil.copytree(chain.manifest.parent, tmp_path / "data"))
    rows = [json.loads(line) for line in (data / "manifest.jsonl").read_text().splitlines()]
    rows[3]["findings"] = " ".join(["The heart is normal in size."] * 40)
    manifest = data / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows + rows[:2]))
    cfg = make_config("stage1", "tiny", manifest=str(manifest), init_model=str(chain.runs["lm"] / "model"),
                      out_dir=str(tmp_path / "run"), max_steps=1, max_length=300)
    train(cfg)
    err = capsys.readouterr().err
    assert err.count(f"radtrt: warning: 1 manifest row is longer than --max-length 300 ids with the prompt, and cut "
                     f"(first: {manifest}:4, ") == 1, err
    assert err.count(f"radtrt: warning: 2 manifest rows repeat an earlier row (first: {manifest}:{len(rows) + 1}, a "
                     f"copy of line 1); each copy is trained on") == 1, err
    (data / "unique.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows[:3] + rows[4:6]))
    train(make_config("stage1", "tiny", manifest=str(data / "unique.jsonl"),
                      init_model=str(chain.runs["lm"] / "model"), out_dir=str(tmp_path / "run2"), max_steps=1))
    assert "warning" not in capsys.readouterr().err


def test_rows_whose_prompt_fills_max_length_are_said_to_train_nothing(chain: Chain, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """Indications long enough to fill --max-length left no report id to train on: the warning said only that the
    report's end was cut, and with every row so the run trained on nothing (loss 0 at every step) and exited 0 with
    its starting model."""
    import shutil

    data = Path(shutil.copytree(chain.manifest.parent, tmp_path / "data"))
    rows = [json.loads(line) for line in (data / "manifest.jsonl").read_text().splitlines()]
    long = "Cough and fever for many days. " * 60
    manifest = data / "long.jsonl"
    manifest.write_text("".join(json.dumps({**row, "indication": long}) + "\n" for row in rows))
    cfg = make_config("stage2", "tiny", manifest=str(manifest), init_model=str(chain.runs["stage1"] / "model"),
                      out_dir=str(tmp_path / "run"), max_steps=1, max_length=300)
    with pytest.raises(RadtrtError, match=f"every manifest row's prompt fills --max-length 300 ids before its report "
                                          f"\\(shortest: {re.escape(str(manifest))}:\\d+, (\\d+) ids\\), so the run "
                                          f"would train on nothing; give --max-length \\d+ or more") as refused:
        train(cfg)
    assert not (tmp_path / "run").exists()
    needed = int(re.search(r"give --max-length (\d+)", str(refused.value)).group(1))  # type: ignore[union-attr]
    manifest.write_text("".join(json.dumps({**row, "indication": long} if i == 2 else row) + "\n"
                                for i, row in enumerate(rows)))
    train(cfg)
    err = " ".join(capsys.readouterr().err.split())
    assert f"radtrt: warning: 1 manifest row trains on nothing: the prompt alone fills --max-length 300 ids (first: " \
           f"{manifest}:3, {needed - 1} ids before its report" in err, err
    assert "longer than --max-length" not in err  # not also counted among the rows whose report's end is cut


def test_rows_the_v1_masking_ignores_are_said_and_all_of_them_refused(chain: Chain, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """A literal '</s>' in a report (an LLM-synthesized one, say) splits the v1 conversation and the released masking
    ignores every label of the row: such rows were dropped without a word, and with every row so the run trained on
    nothing (loss 0, grad 0) and exited 0 with its starting model."""
    import shutil

    data = Path(shutil.copytree(chain.manifest.parent, tmp_path / "data"))
    rows = [json.loads(line) for line in (data / "manifest.jsonl").read_text().splitlines()]
    split = [{**row, "findings": row["findings"].replace(".", ".</s>", 1)} for row in rows]
    manifest = data / "split.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in split))
    cfg = make_config("stage2", "tiny", manifest=str(manifest), init_model=str(chain.runs["stage1"] / "model"),
                      out_dir=str(tmp_path / "run"), max_steps=1)
    with pytest.raises(RadtrtError, match=f"every manifest row would train on nothing: the released v1 masking .*"
                                          f"and {len(rows)} do \\(first: {re.escape(str(manifest))}:1\\)$"):
        train(cfg)
    assert not (tmp_path / "run").exists()
    manifest.write_text("".join(json.dumps(split[i] if i == 2 else row) + "\n" for i, row in enumerate(rows)))
    train(cfg)
    err = " ".join(capsys.readouterr().err.split())
    assert err.count("radtrt: warning: 1 manifest row trains on nothing: the released v1 masking ignores every label "
                     "of a row whose text splits its conversation") == 1 and f"(first: {manifest}:3)" in err, err


def test_a_diverging_run_stops_without_writing_a_model(chain: Chain, tmp_path: Path) -> None:
    """lr 1e30: NaN from the first steps on, rc 0, a model of NaNs every later command refused, NaN in the log."""
    cfg = make_config("stage1", "tiny", manifest=str(chain.manifest), init_model=str(chain.runs["lm"] / "model"),
                      out_dir=str(tmp_path / "run"), max_steps=6, save_every=1)
    object.__setattr__(cfg, "lr", 1e30)  # above TrainConfig's bound now: the loop's own check is what is tested
    with pytest.raises(RadtrtError, match="training diverged at step [0-9]+: loss .*a lower --lr.*the checkpoints "
                                          "before it are kept$"):
        train(cfg)
    assert not (tmp_path / "run" / "model").exists()
    assert all(json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines())


def test_a_step_that_makes_the_weights_non_finite_stops_the_run(chain: Chain, tmp_path: Path) -> None:
    """lr 10 and weight decay 1e38 (from before TrainConfig bounded them): the loss and gradient checked before the
    step were finite, the step made the projector infinite, and the run ended with exit 0 and an infinite model."""
    cfg = make_config("stage1", "tiny", manifest=str(chain.manifest), init_model=str(chain.runs["lm"] / "model"),
                      out_dir=str(tmp_path / "run"), max_steps=2, save_every=1)
    object.__setattr__(cfg, "lr", 10.0)  # what the checks in TrainConfig now refuse: the step itself is checked
    object.__setattr__(cfg, "weight_decay", 1e38)
    with pytest.raises(RadtrtError, match="training diverged at step 2: the step made llava.mm_projector.0.weight "
                                          "non-finite \\(a lower --lr\\?\\)"):  # step 1 is warmup, at lr 0
        train(cfg)
    assert not (tmp_path / "run" / "model").exists()
    state = load_checkpoint(tmp_path / "run")  # the last one saved is step 1's, finite
    assert state["step"] == 1 and all(torch.isfinite(t).all() for t in state["trainable"].values())


def test_a_one_step_run_trains(chain: Chain, tmp_path: Path) -> None:
    """Its one step was all warmup, at lr 0: the model came out bit-identical to the one that went in."""
    run = run_stage("stage1", chain.manifest, chain.runs["lm"] / "model", tmp_path / "run", max_steps=1)
    assert read_log(run)[0]["lr"] > 0
    before = load_tensors(chain.runs["lm"] / "model" / "model.safetensors")
    after = load_tensors(run / "model" / "model.safetensors")
    assert not torch.equal(before["mm_projector.0.weight"], after["mm_projector.0.weight"])


def test_a_checkpoint_that_cannot_be_written_is_one_line(chain: Chain, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from radtrt.training import checkpoint as ckpt

    def full_disk(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file")

    monkeypatch.setattr(ckpt.torch, "save", full_disk)
    run = tmp_path / "run"
    with pytest.raises(RadtrtError) as failed:
        run_stage("stage1", chain.manifest, chain.runs["lm"] / "model", run, max_steps=2)
    # the first checkpoint: the folder, left holding the run's config and log, refused the rerun it told the user to
    # make; what the run wrote is removed, and the folder, which it created
    assert re.fullmatch(f"cannot write training checkpoint {run}/checkpoint/state.pt \\(.*PytorchStreamWriter failed "
                        f"writing file; [0-9]+ MB free there\\); it was the run's first; so there is nothing to resume: "
                        f"{run}, which this run had created, was removed; once that is fixed, run the training "
                        f"command again", str(failed.value)), str(failed.value)
    assert not run.exists()

    def full_disk_and_a_note(*_args: object, **_kwargs: object) -> None:
        (run / "notes.txt").write_text("the user's")  # put in meanwhile: never removed, the remedy is then to delete
        full_disk()

    monkeypatch.setattr(ckpt.torch, "save", full_disk_and_a_note)
    with pytest.raises(RadtrtError, match=f"once that is fixed, delete {run} and run the training command again \\(or "
                                          f"choose another -o\\)$"):
        run_stage("stage1", chain.manifest, chain.runs["lm"] / "model", run, max_steps=2)
    assert (run / "notes.txt").read_text() == "the user's"


def test_a_model_folder_is_never_left_half_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """convert and training wrote straight into the folder: a kill or a full disk left a part of a model there."""
    from radtrt.model.loading import LoadedModel
    from radtrt.model.tiny import random_model, train_tiny_tokenizer
    from radtrt.model.tokenizer import LlamaSPTokenizer

    loaded = LoadedModel(random_model(seed=0), train_tiny_tokenizer(), "tiny")

    def full_disk(self: object, directory: Path) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(LlamaSPTokenizer, "save", full_disk)
    with pytest.raises(RadtrtError, match="cannot write model folder .*No space left on device"):
        save_toolkit(loaded, tmp_path / "model")
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_while_writing_the_model_says_resume_writes_it(chain: Chain, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """After the last step: 'cannot write model folder ...: No space left on device', and no word of the resume
    that writes the model from the last checkpoint."""
    from radtrt.model.tokenizer import LlamaSPTokenizer
    from radtrt.training.loop import resume_config

    def full_disk(self: object, directory: Path) -> None:
        raise OSError(28, "No space left on device")

    run = tmp_path / "run"
    cfg = make_config("stage1", "tiny", manifest=str(chain.manifest), init_model=str(chain.runs["lm"] / "model"),
                      out_dir=str(run), max_steps=2)
    monkeypatch.setattr(LlamaSPTokenizer, "save", full_disk)
    with pytest.raises(RadtrtError, match="No space left on device.*; all 2 steps are saved in .*state.pt: to write "
                                          f"the model without training again once that is fixed, run: radtrt train "
                                          f"resume {run}$"):
        train(cfg)
    monkeypatch.undo()
    assert train(resume_config(run), resume=True).model_dir == run / "model"
    assert [e["step"] for e in read_log(run)] == [1, 2]


def test_a_run_folder_given_as_a_model_is_said_to_be_one(chain: Chain, tmp_path: Path) -> None:
    """'missing file: RUN/config.json' (convert, train eval, train <stage> --model RUN)."""
    import shutil

    run = chain.runs["stage1"]
    with pytest.raises(RadtrtError, match=f"{run} is a training run folder, not a model: give its model, {run}/model$"):
        load_model(run)
    unfinished = tmp_path / "un finished"
    shutil.copytree(run, unfinished, ignore=shutil.ignore_patterns("model"))
    with pytest.raises(RadtrtError) as refused:
        load_model(unfinished)
    # the command last and bare, so that it pastes: it was 'radtrt train resume '/…/un finished'', quotes in quotes
    said, command = str(refused.value).split(" run: ")
    assert said == f"{unfinished} is a training run folder that has not written its model yet: give " \
                   f"{unfinished}/model once it has; to finish it,"
    assert shlex.split(command) == ["radtrt", "train", "resume", str(unfinished)]
    # no checkpoint either: resume refuses such a run (it stopped before its first), and was suggested all the same
    shutil.rmtree(unfinished / "checkpoint")
    with pytest.raises(RadtrtError, match=f"{unfinished} is a training run folder with neither a model nor a "
                                          f"checkpoint yet .*: give {unfinished}/model once it has one$") as refused:
        load_model(unfinished)
    assert "resume" not in str(refused.value)


def test_a_lora_adapter_folder_given_as_a_model_is_said_to_be_one(chain: Chain, tmp_path: Path) -> None:
    """RUN/lora as --model (convert, train stage2, infer) said only "missing file: RUN/lora/config.json"."""
    import shutil

    run = chain.runs["stage2"]
    with pytest.raises(RadtrtError, match=f"{run}/lora is a PEFT LoRA adapter folder, not a model: give its training "
                                          f"run's model, {run}/model \\('radtrt convert --to llava-rad' takes the "
                                          f"run folder {run} to publish the adapter\\)$"):
        load_model(run / "lora")
    shutil.copytree(run / "lora", tmp_path / "adapter")
    with pytest.raises(RadtrtError, match="adapter is a PEFT LoRA adapter folder \\(adapter_config.json\\), not a "
                                          "model: give the model it belongs to"):
        load_model(tmp_path / "adapter")


def test_a_run_folder_given_as_base_model_is_said_to_be_one(chain: Chain, tiny_release: TinyRelease) -> None:
    """--base-model RUN said 'missing file: RUN/config.json' too."""
    run = chain.runs["stage1"]
    with pytest.raises(RadtrtError, match=f"--base-model {run} is a radtrt training run folder, not a base language "
                                          f"model"):
        load_model(tiny_release.release_dir, run)


def test_two_runs_started_into_one_folder_do_not_share_it(chain: Chain, tmp_path: Path) -> None:
    """Both passed the start-up check (the folder was empty for each) and interleaved one log.jsonl."""
    from radtrt.training.distributed import DistInfo
    from radtrt.training.loop import _prepare_run_dir

    cfg = make_config("stage1", "tiny", manifest=str(chain.manifest), init_model=str(chain.runs["lm"] / "model"),
                      out_dir=str(tmp_path / "run"))
    first = _prepare_run_dir(cfg, tmp_path / "run", False, DistInfo())  # the first run, once its inputs were accepted
    assert first is not None
    with first, pytest.raises(RadtrtError, match="was taken by another run started at the same time"):
        _prepare_run_dir(cfg, tmp_path / "run", False, DistInfo())  # the second, a moment later
    with pytest.raises(RadtrtError, match="was taken by another run started at the same time"):
        _prepare_run_dir(cfg, tmp_path / "run", False, DistInfo())  # or once the first has ended


class _FullDiskFile:
    """A file whose writes fail as on a full disk (what a tmpfs mount would take root to show)."""

    def __init__(self, real: object) -> None:
        self.real = real

    def __enter__(self) -> "_FullDiskFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.real.close()  # type: ignore[attr-defined]

    def write(self, text: str) -> int:
        raise OSError(28, "No space left on device")


def test_a_full_disk_at_the_start_of_a_run_leaves_nothing_that_blocks_a_retry(chain: Chain, tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The exclusive write of train_config.json was a traceback and left it empty: neither a rerun ('not empty')
    nor a resume ('no checkpoint') could go on."""
    import builtins

    from radtrt.training import loop

    real_open = builtins.open

    def full_disk_open(path: object, mode: str = "r", *args: object, **kwargs: object) -> object:
        f = real_open(path, mode, *args, **kwargs)  # type: ignore[call-overload]
        return _FullDiskFile(f) if "x" in mode else f

    cfg = make_config("stage1", "tiny", manifest=str(chain.manifest), init_model=str(chain.runs["lm"] / "model"),
                      out_dir=str(tmp_path / "run"), max_steps=2)
    monkeypatch.setattr(loop, "open", full_disk_open, raising=False)
    with pytest.raises(RadtrtError, match="cannot write train_config.json .*No space left on device.*run the "
                                          "command again"):
        train(cfg)
    assert list((tmp_path / "run").iterdir()) == []
    monkeypatch.undo()
    assert train(cfg).model_dir is not None  # the retry


def test_a_full_disk_while_logging_a_step_is_one_line_and_resumable(chain: Chain, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from radtrt.training.loop import resume_config

    real_open = Path.open
    appended = []

    def full_disk_after_two(self: Path, mode: str = "r", *args: object, **kwargs: object) -> object:
        if self.name == "log.jsonl" and mode == "a":
            appended.append(1)
            if len(appended) > 2:
                return _FullDiskFile(real_open(self, mode, *args, **kwargs))
        return real_open(self, mode, *args, **kwargs)

    cfg = make_config("stage1", "tiny", manifest=str(chain.manifest), init_model=str(chain.runs["lm"] / "model"),
                      out_dir=str(tmp_path / "run"), max_steps=4, save_every=2)
    monkeypatch.setattr(Path, "open", full_disk_after_two)
    with pytest.raises(RadtrtError, match="cannot append to training log .*No space left on device.*train resume"):
        train(cfg)
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "run")["step"] == 2
    assert train(resume_config(tmp_path / "run"), resume=True).model_dir is not None
    assert [e["step"] for e in read_log(tmp_path / "run")] == [1, 2, 3, 4]


def test_a_run_folder_is_trained_in_by_one_process_at_a_time(chain: Chain, tmp_path: Path) -> None:
    """Two 'train resume RUN' at once both ran: one log.jsonl interleaved for good, each removed the other's lora/."""
    import subprocess
    import sys

    from radtrt.training.loop import resume_config

    run = tmp_path / "run"
    cfg = make_config("stage1", "tiny", manifest=str(chain.manifest), init_model=str(chain.runs["lm"] / "model"),
                      out_dir=str(run), max_steps=4, save_every=2)
    train(cfg, stop_after=2)
    assert not (run / "train.lock").exists()  # let go, and removed, when the run ends
    holder = subprocess.Popen(  # another radtrt, in the middle of its run
        [sys.executable, "-c", "import sys; from pathlib import Path; from radtrt.training.runlock import lock_run; "
         "lock = lock_run(Path(sys.argv[1]), 'busy'); print('locked', flush=True); sys.stdin.read()", str(run)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        log_before = (run / "log.jsonl").read_text()
        with pytest.raises(RadtrtError, match=f"process {holder.pid} is training in .*run right now.*wait for it"):
            train(resume_config(run), resume=True)
        with pytest.raises(RadtrtError, match=f"process {holder.pid} is training in .*run right now; choose another"):
            train(cfg)
        assert (run / "log.jsonl").read_text() == log_before
    finally:
        holder.communicate("")  # ends it: its lock goes with it
    assert train(resume_config(run), resume=True).model_dir is not None
    assert [e["step"] for e in read_log(run)] == [1, 2, 3, 4]


def test_resume_removes_the_temporary_files_of_saves_that_were_killed(chain: Chain, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """kill -9 during a save left checkpoint/.state.pt.XXXXXXXX.partial (replaced_atomically's mkstemp name), as
    large as the checkpoint, for good. Resume removes it once it holds the run's lock, and nothing else; while
    another process holds the lock (its save in progress writes such a file), nothing is removed."""
    import subprocess
    import sys
    import tempfile

    from radtrt.training.loop import resume_config

    run = tmp_path / "run"
    cfg = make_config("stage1", "tiny", manifest=str(chain.manifest), init_model=str(chain.runs["lm"] / "model"),
                      out_dir=str(run), max_steps=4, save_every=2)
    train(cfg, stop_after=2)
    folder = run / "checkpoint"
    fd, name = tempfile.mkstemp(dir=folder, prefix=".state.pt.", suffix=".partial")  # what the killed save left
    os.write(fd, b"\0" * 4096)
    os.close(fd)
    leftover = Path(name)
    others = [folder / n for n in (".state.pt.partial", ".state.pt.abc.partial", ".state.pt.abcd1234.partial.keep",
                                   "notes.partial", ".log.jsonl.abcd1234.partial", ".state.pt.ABCD1234.partial")]
    for other in others:
        other.write_text("the user's")
    linked = folder / ".state.pt.zz99zz99.partial"  # a link is not a file radtrt wrote
    linked.symlink_to(tmp_path / "target")
    (tmp_path / "target").write_text("the user's")
    holder = subprocess.Popen(  # another radtrt, in the middle of its run (and maybe of a save)
        [sys.executable, "-c", "import sys; from pathlib import Path; from radtrt.training.runlock import lock_run; "
         "lock = lock_run(Path(sys.argv[1]), 'busy'); print('locked', flush=True); sys.stdin.read()", str(run)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(RadtrtError, match="is training in .*run right now"):
            train(resume_config(run), resume=True)
        assert leftover.is_file()
    finally:
        holder.communicate("")
    capsys.readouterr()
    assert train(resume_config(run), resume=True).model_dir is not None
    assert not leftover.exists()
    assert f"removed 1 unfinished checkpoint save (checkpoint/{leftover.name}) left by an interrupted run" in \
        capsys.readouterr().err
    assert all(other.read_text() == "the user's" for other in others)
    assert linked.is_symlink() and (tmp_path / "target").read_text() == "the user's"


def test_a_run_stopped_before_its_first_checkpoint_says_what_to_do(chain: Chain, tmp_path: Path) -> None:
    """resume said only 'no training checkpoint in RUN' and a rerun 'run folder ... is not empty'."""
    from radtrt.training.loop import resume_config

    run = tmp_path / "run"
    cfg = make_config("stage1", "tiny", manifest=str(chain.manifest), init_model=str(chain.runs["lm"] / "model"),
                      out_dir=str(run), max_steps=4, save_every=2)
    run.mkdir()  # what a run killed before step 2's checkpoint leaves (and the lock file, once it has one)
    (run / "train_config.json").write_text(cfg.to_json())
    (run / "log.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    message = "stopped before its first checkpoint, so there is nothing to resume: delete the folder"
    with pytest.raises(RadtrtError, match=message):
        resume_config(run)
    with pytest.raises(RadtrtError, match=message):
        train(cfg)


@pytest.mark.parametrize("before", ["absent", "empty", "user file added"])
def test_a_run_interrupted_before_its_first_checkpoint_removes_what_it_wrote(chain: Chain, tmp_path: Path, before: str,
                                                                             monkeypatch: pytest.MonkeyPatch,
                                                                             capsys: pytest.CaptureFixture) -> None:
    """It said 'nothing to resume: delete RUN and run the command again' of a folder holding only its own config and
    log: radtrt removes them itself (and the folder, when it made it), never a file it did not write."""
    from radtrt.training import loop

    run = tmp_path / "run"
    if before != "absent":
        run.mkdir()

    def interrupted(*args: object) -> None:
        if before == "user file added":
            (run / "notes.txt").write_text("mine")
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "_append_log", interrupted)
    cfg = make_config("stage1", "tiny", manifest=str(chain.manifest), init_model=str(chain.runs["lm"] / "model"),
                      out_dir=str(run), max_steps=4, save_every=2)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    err = " ".join(capsys.readouterr().err.split())
    head = "radtrt: interrupted before the first checkpoint, so there is nothing to resume"
    if before == "absent":
        assert not run.exists() and f"{head}; {run}, which this run had created, was removed: run the command again" in err
    elif before == "empty":
        assert list(run.iterdir()) == [] and f"{head}; this run's files in {run} were removed" in err
    else:
        assert (run / "notes.txt").read_text() == "mine" and (run / "train_config.json").is_file()
        assert f"{head}: delete {run} and run the command again" in err


def test_resuming_a_run_folder_that_does_not_exist_says_so(tmp_path: Path) -> None:
    """It said 'no training checkpoint in RUN (expected checkpoint/state.pt)' of a mistyped folder."""
    from radtrt.training.loop import resume_config

    with pytest.raises(RadtrtError, match=f"run folder {tmp_path / 'nope'} does not exist$"):
        resume_config(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(RadtrtError, match=f"run folder {tmp_path / 'file'} is not a folder$"):
        resume_config(tmp_path / "file")


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_the_feature_cache_changes_only_the_speed(chain: Chain, tmp_path: Path, precision: str) -> None:
    """In bf16 the cache held fp32 trunk features (computed outside autocast) while the per-step path ran the trunk
    under bf16 autocast: the losses differed with and without the cache."""
    losses = {}
    for cache in (True, False):
        run = run_stage("stage1", chain.manifest, chain.runs["lm"] / "model", tmp_path / f"cache-{cache}",
                        max_steps=3, precision=precision, cache_features=cache)
        losses[cache] = [e["loss"] for e in read_log(run)]
    assert losses[True] == losses[False], losses


def test_a_dataloader_worker_ends_with_status_0_on_sigterm() -> None:
    """Killed by the signal, torch's SIGCHLD handler raised in the training process and printed tracebacks.
    The signal comes from another process (a scheduler, ``kill``): torch's own worker handler ends quietly
    only on its parent's SIGTERM."""
    import subprocess

    batches = iter(torch.utils.data.DataLoader(range(8), num_workers=1, worker_init_fn=_quiet_on_sigterm))
    next(batches)
    worker = batches._workers[0]  # type: ignore[attr-defined]
    subprocess.run(["kill", "-TERM", str(worker.pid)], check=True)
    worker.join(30)
    assert worker.exitcode == 0
    del batches


def test_the_non_frontal_warning_writes_the_manifest_path_on_one_line(tmp_path: Path) -> None:
    """The manifest's path went to stderr as it was: a newline in a folder name split the warning in two."""
    import os

    from radtrt.training.data import non_frontal_warning

    folder = tmp_path / os.fsdecode(b"site\nA\xfe")
    folder.mkdir()
    (folder / "manifest.jsonl").write_text('{"image": "a.dcm", "findings": "x"}\n')
    warning = non_frontal_warning([f"{folder / 'manifest.jsonl'}:1"], [(0, "LL")])
    assert "\n" not in warning and f"{tmp_path}/site\\nA\\xfe/manifest.jsonl:1, a LL view" in warning


def test_resume_hints_paste_into_a_shell(tmp_path: Path) -> None:
    """'radtrt train resume '/…/my run'' nested the path's quotes in the hint's own: pasted, the shell joined
    them into /…/my and run. The command now ends the line, bare."""
    from radtrt.training.loop import _image_failed, _interrupted

    run = tmp_path / "my run"
    for line in (_interrupted(run, 3), _image_failed("x.png: damaged", run, 3)):
        assert shlex.split(line.rsplit("run: ", 1)[1]) == ["radtrt", "train", "resume", str(run)], line
    assert _interrupted(run, 3).startswith("radtrt: interrupted; to go on from step 3, its last checkpoint, run: ")


def _train_interrupted(cfg: Any) -> None:
    """``train(cfg)`` under radtrt's signal handlers (as the CLI installs them), ended by an interrupt."""
    import signal

    from radtrt import interrupts

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    interrupts.install()
    try:
        with pytest.raises(KeyboardInterrupt):
            train(cfg)
    finally:
        signal.signal(signal.SIGINT, before[0])
        signal.signal(signal.SIGTERM, before[1])


def test_a_sigterm_as_the_first_checkpoint_is_saved_names_that_checkpoint(chain: Chain, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch,
                                                                         capsys: pytest.CaptureFixture) -> None:
    """A SIGTERM landing once state.pt was on disk but before the loop recorded it said 'nothing to resume: delete
    RUN' (a flaky CI failure): the save and its record are one step, and the signal lands after both."""
    import os
    import signal

    from radtrt.training import checkpoint as ckpt

    save = ckpt.save_checkpoint

    def save_then_signalled(run_dir: Path, state: dict) -> None:
        save(run_dir, state)
        os.kill(os.getpid(), signal.SIGTERM)  # the scheduler's, just as the first checkpoint lands

    monkeypatch.setattr(ckpt, "save_checkpoint", save_then_signalled)
    run = tmp_path / "run"
    cfg = make_config("stage1", "tiny", manifest=str(chain.manifest), init_model=str(chain.runs["lm"] / "model"),
                      out_dir=str(run), max_steps=4, save_every=2)
    _train_interrupted(cfg)
    err = " ".join(capsys.readouterr().err.split())
    assert "to go on from step 2, its last checkpoint, run: radtrt train resume" in err, err
    assert "radtrt: finishing the checkpoint save first, then stopping" in err  # a held press is not silent
    assert ckpt.state_path(run).is_file()


def test_an_interrupt_as_the_loader_starts_its_workers_stops_the_run(chain: Chain, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch,
                                                                      capsys: pytest.CaptureFixture) -> None:
    """A Ctrl-C landing while the DataLoader forked its workers ran in logging's at-fork hook, where Python ignores
    exceptions: training went on for hundreds of steps. And one that did raise there left the run folder's files
    behind under the generic line. Held through the start, it stops the run, which removes its files."""
    import os
    import signal


    start = torch.utils.data.DataLoader.__iter__

    def forked(self: torch.utils.data.DataLoader) -> object:
        try:  # as os.fork's at-fork hooks run: an exception raised inside is printed and ignored
            os.kill(os.getpid(), signal.SIGINT)
        except KeyboardInterrupt:
            pass
        return start(self)

    monkeypatch.setattr(torch.utils.data.DataLoader, "__iter__", forked)
    run = tmp_path / "run"
    cfg = make_config("stage1", "tiny", manifest=str(chain.manifest), init_model=str(chain.runs["lm"] / "model"),
                      out_dir=str(run), max_steps=2, save_every=2)
    _train_interrupted(cfg)
    err = " ".join(capsys.readouterr().err.split())
    assert "interrupted before the first checkpoint" in err and "which this run had created, was removed" in err, err
    assert not run.exists()


def test_an_interrupt_once_the_model_is_in_place_says_it_is_complete(chain: Chain, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture) -> None:
    """One landing after RUN/model was renamed into place said to resume, which then refused: nothing to resume."""
    from radtrt.training import loop

    write = loop.write_outputs

    def written_then_interrupted(*args: object, **kwargs: object) -> Path:
        write(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "write_outputs", written_then_interrupted)
    run = tmp_path / "run"
    cfg = make_config("stage1", "tiny", manifest=str(chain.manifest), init_model=str(chain.runs["lm"] / "model"),
                      out_dir=str(run), max_steps=2, save_every=2)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    err = " ".join(capsys.readouterr().err.split())
    assert f"radtrt: interrupted after the last step; the model is complete in {run / 'model'}" in err, err
    assert "train resume" not in err
