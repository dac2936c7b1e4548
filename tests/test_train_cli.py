"""``radtrt train ...`` commands end to end, and two-process DDP (gloo on CPU) under torchrun."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from radtrt.model.io import load_tensors
from radtrt.training.checkpoint import load_checkpoint
from radtrt.training.cli import register
from radtrt.training.config import make_config
from radtrt.training.loop import read_log, train

from test_train_loop import Chain, chain, one_thread  # noqa: F401 - shared module fixtures

runner = CliRunner()


def _app() -> typer.Typer:
    app = typer.Typer()
    app.callback()(lambda: None)
    register(app)
    return app


def _invoke(*args: object) -> tuple[int, str, str]:
    result = runner.invoke(_app(), [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def test_train_commands(chain: Chain, tmp_path: Path) -> None:
    code, out, err = _invoke("train", "tokenizer", chain.manifest, "-o", tmp_path / "tok", "--vocab-size", "400")
    assert code == 0, err
    code, out, err = _invoke("train", "init", "--tokenizer", tmp_path / "tok", "--arch", "tiny", "-o", tmp_path / "init")
    assert code == 0, err
    before = (tmp_path / "init" / "tokenizer.model").read_bytes()  # a model's tokenizer is never replaced
    code, _, err = _invoke("train", "tokenizer", chain.manifest, "-o", tmp_path / "init", "--vocab-size", "300")
    assert code == 2 and "is not empty" in err and (tmp_path / "init" / "tokenizer.model").read_bytes() == before
    code, out, err = _invoke("train", "stage1", chain.manifest, "--model", tmp_path / "init", "-o", tmp_path / "run",
                             "--preset", "tiny", "--max-steps", "2", "--threads", "1", "--name", "cli-test")
    assert code == 0, err
    model_dir = Path(out.strip())
    assert model_dir == tmp_path / "run" / "model"
    assert json.loads((model_dir / "config.json").read_text())["name"] == "cli-test"
    assert [e["step"] for e in read_log(tmp_path / "run")] == [1, 2]
    code, _, err = _invoke("train", "resume", tmp_path / "run")
    assert code == 2 and "nothing to resume" in err
    code, out, err = _invoke("train", "eval", chain.manifest, "--model", chain.runs["stage2"] / "model", "--limit", "2",
                             "--max-new-tokens", "8", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["n"] == 2 and 0.0 <= result["micro_f1"] <= 1.0 and len(result["examples"]) == 2


@pytest.mark.parametrize("args, message", [
    (("train", "lm", "{tmp}/missing.jsonl", "--model", "{model}", "-o", "{tmp}/r"), "not found"),
    (("train", "stage2", "{manifest}", "--model", "{model}", "-o", "{tmp}/r", "--precision", "fp8"), "precision"),
    (("train", "init", "--tokenizer", "{tmp}", "--arch", "huge", "-o", "{tmp}/i"), "unknown --arch"),
    (("train", "init", "--tokenizer", "{model}", "--arch", "tiny", "-o", "{tmp}/r", "--seed", "-1"), "--seed must be in"),
])
def test_train_errors_are_one_line(chain: Chain, tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    fill = {"manifest": chain.manifest, "model": chain.runs["stage1"] / "model", "tmp": tmp_path}
    code, _, err = _invoke(*(a.format(**fill) for a in args))
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()  # nothing written for refused input


@pytest.mark.parametrize("command", ["stage1", "eval", "resume"])
def test_more_threads_than_cpus_are_refused(chain: Chain, tmp_path: Path, command: str) -> None:
    """--threads 100000: "can't start new thread", then a segfault (exit 139)."""
    model = chain.runs["lm"] / "model"
    args = {"stage1": ("stage1", chain.manifest, "--model", model, "-o", tmp_path / "r", "--preset", "tiny"),
            "eval": ("eval", chain.manifest, "--model", model), "resume": ("resume", tmp_path / "r")}[command]
    too_many = (os.cpu_count() or 1) + 1
    code, _, err = _invoke("train", *args, "--threads", too_many)
    assert code == 2 and f"--threads {too_many} is more than this machine's {os.cpu_count()} CPUs" in err
    assert not (tmp_path / "r").exists()


def test_more_workers_than_cpus_are_refused(chain: Chain, tmp_path: Path) -> None:
    """--num-workers 100000: the process was killed (exit 137, no message) and its workers left running."""
    too_many = (os.cpu_count() or 1) + 1
    code, _, err = _invoke("train", "stage1", chain.manifest, "--model", chain.runs["lm"] / "model", "-o",
                           tmp_path / "r", "--preset", "tiny", "--num-workers", too_many)
    assert code == 2 and f"--num-workers {too_many} is more than this machine's {os.cpu_count()} CPUs" in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("command", ["stage1", "eval"])
def test_a_run_folder_as_model_names_its_model(chain: Chain, tmp_path: Path, command: str) -> None:
    run = chain.runs["lm"]
    args = {"stage1": ("stage1", chain.manifest, "--model", run, "-o", tmp_path / "r", "--preset", "tiny"),
            "eval": ("eval", chain.manifest, "--model", run)}[command]
    code, _, err = _invoke("train", *args)
    assert code == 2 and "is a training run folder, not a model: give its model" in err  # was "missing file"
    assert not (tmp_path / "r").exists()


def _ddp_worker(rank: int, world: int, port: int, manifest: str, init: str, out: str) -> None:
    """One torchrun-style process: the environment torchrun sets, then the library call it makes."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    train(make_config("stage1", "tiny", manifest=manifest, init_model=init, out_dir=out, max_steps=3,
                      micro_batch_size=2, grad_accum=1, save_every=100))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_equal_one_process_with_accumulation(chain: Chain, tmp_path: Path) -> None:
    """2 gloo ranks x micro-batch 2 average the same gradients as 1 process x 2 accumulated micro-batches.

    The ranks are forked from this process with the environment torchrun would give them (a
    torchrun subprocess works the same, ``radtrt.training.distributed``, but costs two fresh
    interpreter starts).
    """
    init = chain.runs["lm"] / "model"
    torch.multiprocessing.start_processes(
        _ddp_worker, args=(2, _free_port(), str(chain.manifest), str(init), str(tmp_path / "ddp")), nprocs=2,
        start_method="fork")
    state = load_checkpoint(tmp_path / "ddp")
    assert state["world_size"] == 2 and len(state["rng"]) == 2 and state["step"] == 3
    single = train(make_config("stage1", "tiny", manifest=str(chain.manifest), init_model=str(init),
                               out_dir=str(tmp_path / "single"), max_steps=3, micro_batch_size=2, grad_accum=2,
                               save_every=100))
    ddp_losses = [e["loss"] for e in read_log(tmp_path / "ddp")]
    assert ddp_losses == pytest.approx(single.losses, rel=1e-5)
    a = load_tensors(tmp_path / "ddp" / "model" / "model.safetensors")
    b = load_tensors(tmp_path / "single" / "model" / "model.safetensors")
    for key in ("mm_projector.0.weight", "mm_projector.2.bias"):
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    assert not torch.equal(a["mm_projector.0.weight"], load_tensors(init / "model.safetensors")["mm_projector.0.weight"])


@pytest.mark.parametrize("option, value, message", [
    ("--save-every", "0", "--save-every must be at least 1"),  # divided by zero at the first step
    ("--max-steps", "0", "--max-steps must be at least 1"),  # read as "unset": trained full epochs
    ("--lora-dropout", "1.5", "--lora-dropout must be in [0, 1)"),  # torch's ValueError traceback
    ("--num-workers", "-1", "--num-workers must be at least 0"),
    ("--lr", "nan", "--lr must be a finite number"),  # NaN passed every range check
    ("--lr", "inf", "--lr must be a finite number"),  # trained to non-finite weights
    ("--epochs", "inf", "--epochs must be a finite number"),
    ("--max-grad-norm", "nan", "--max-grad-norm must be a finite number"),
    ("--weight-decay", "nan", "--weight-decay must be a finite number"),
    ("--lr", "1e38", "--lr must be at most 1"),  # AdamW's overflow traceback, and a run folder left behind
    ("--weight-decay", "1e38", "--weight-decay must be in [0, 1]"),  # with --lr 10: infinite weights, exit 0
    # one line for three options ("lr and epochs must be positive and warmup_ratio in [0, 1)"): which one? Each
    # said by its option's name, not its field's ("lr must be positive": the user typed --lr)
    ("--lr", "0", "--lr must be positive, got 0.0"),
    ("--epochs", "-1", "--epochs must be positive, got -1.0"),
    ("--warmup-ratio", "1", "--warmup-ratio must be in [0, 1), got 1.0"),
    ("--weight-decay", "-0.1", "--weight-decay must be at least 0, got -0.1"),
    ("--max-grad-norm", "0", "--max-grad-norm must be positive, got 0.0"),
    ("--seed", str(2**64), "--seed must be in"),  # torch's RuntimeError traceback
    ("--lora-alpha", "0", "--lora-alpha must be at least 1"),  # a LoRA that can never change the model
    ("--lora-r", "100000", "above the rank of this decoder's smallest linear layer"),  # an allocation failure
    ("--max-length", "3", "leaves no report token to train on"),  # failed at the first step, after the run folder
    ("--max-length", "90", "leaves no report token to train on"),  # kept the <image>, not one report token: loss 0
    ("--micro-batch-size", "0", "--micro-batch-size must be at least 1"),
    ("--grad-accum", "0", "--grad-accum must be at least 1"),
    ("--precision", "fp8", "unknown --precision 'fp8'"),
])
def test_bad_training_values_are_refused_before_the_run_folder(chain: Chain, tmp_path: Path, option: str,
                                                               value: str, message: str) -> None:
    code, _, err = _invoke("train", "stage2", chain.manifest, "--model", chain.runs["stage1"] / "model", "-o",
                           tmp_path / "r", "--preset", "tiny", "--threads", "1", option, value)
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_an_unreadable_image_in_a_dataloader_worker_is_one_line(chain: Chain, tmp_path: Path) -> None:
    """Images read lazily by worker processes: the worker's error reaches the main process as data, so the
    user sees its one line, not the worker's traceback torch would wrap into the message."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(chain.manifest.parent, data)
    first = json.loads((data / "manifest.jsonl").read_text().splitlines()[0])["image"]
    (data / first).write_bytes((data / first).read_bytes()[:100])
    code, _, err = _invoke("train", "stage1", data / "manifest.jsonl", "--model", chain.runs["lm"] / "model", "-o",
                           tmp_path / "r", "--preset", "tiny", "--threads", "1", "--num-workers", "1",
                           "--no-feature-cache")
    assert code == 2 and "image data is truncated or corrupt" in err
    assert "Traceback" not in err and "worker" not in err


def test_sigterm_to_the_whole_job_stops_in_one_line_with_the_resume_command(chain: Chain, tmp_path: Path) -> None:
    """A scheduler or ``kill`` signals every process of the job, DataLoader workers included: their deaths
    printed two torch tracebacks, and nothing said where the run could go on from."""
    import signal
    import subprocess
    import sys
    import time

    run = tmp_path / "r"
    proc = subprocess.Popen([sys.executable, "-m", "radtrt.cli", "train", "stage1", str(chain.manifest), "--model",
                             str(chain.runs["lm"] / "model"), "-o", str(run), "--preset", "tiny", "--threads", "1",
                             "--num-workers", "2", "--no-feature-cache", "--max-steps", "100000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        # the checkpoint itself, not its folder: made before the first save, which a signal then cut short
        while not (run / "checkpoint" / "state.pt").is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1]
        os.killpg(proc.pid, signal.SIGTERM)  # the main process and its workers, as a scheduler does
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    saved = load_checkpoint(run)["step"]
    assert proc.returncode == 130
    assert "Traceback" not in err and "DataLoader worker" not in err, err
    assert f"to go on from step {saved}, its last checkpoint, run: radtrt train resume {run}" in err
    assert err.count("radtrt: interrupted") == 1  # train's own line, not the CLI's generic one as well


def test_bad_data_and_output_paths_leave_no_run_folder(chain: Chain, tmp_path: Path) -> None:
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"image": "missing.png", "findings": "No effusion."}) + "\n")
    code, _, err = _invoke("train", "stage2", manifest, "--model", chain.runs["stage1"] / "model", "-o",
                           tmp_path / "r", "--preset", "tiny", "--threads", "1")
    assert code == 2 and "not found" in err
    assert not (tmp_path / "r").exists()  # the run folder was written before the images were read
    (tmp_path / "f").write_text("x")
    for args in (("train", "stage2", chain.manifest, "--model", chain.runs["stage1"] / "model", "-o", tmp_path / "f",
                  "--preset", "tiny", "--threads", "1"),
                 ("train", "init", "--tokenizer", chain.runs["stage1"] / "model", "--arch", "tiny", "-o", tmp_path / "f"),
                 ("train", "tokenizer", chain.manifest, "-o", tmp_path / "f")):
        code, _, err = _invoke(*args)
        assert code == 2 and "Traceback" not in err and str(tmp_path / "f") in err, err


def test_a_run_folder_holding_other_files_is_refused(chain: Chain, tmp_path: Path) -> None:
    """Any folder without checkpoint/ or model/ was taken, and the user's log.jsonl there overwritten."""
    out = tmp_path / "r"
    out.mkdir()
    (out / "log.jsonl").write_text("my notes\n")
    code, _, err = _invoke("train", "stage1", chain.manifest, "--model", chain.runs["lm"] / "model", "-o", out,
                           "--preset", "tiny", "--threads", "1")
    assert code == 2 and "is not empty" in err and (out / "log.jsonl").read_text() == "my notes\n"


@pytest.mark.parametrize("stage, option, value, message", [
    ("stage1", "--lora-r", "8", "--lora-r does not apply to 'train stage1' (LoRA is stage 2's)"),
    ("lm", "--lora-dropout", "0.1", "--lora-dropout does not apply to 'train lm'"),
    ("vision", "--max-length", "64", "--max-length does not apply to 'train vision' (it reads no text)"),
    ("stage2", "--max-length", "2048", "max_length 2048 does not fit the model's 512 positions"),  # trained, then
    ("lm", "--max-length", "1", "leaves no report token to train on"),  # one id has nothing to predict: loss 0
])                                                                                                # infer refused it
def test_options_a_stage_does_not_use_or_cannot_fit_are_refused(chain: Chain, tmp_path: Path, stage: str, option: str,
                                                                value: str, message: str) -> None:
    init = {"stage2": chain.runs["stage1"], "stage1": chain.runs["lm"]}.get(stage, chain.init)
    init = init / "model" if init != chain.init else init
    code, _, err = _invoke("train", stage, chain.manifest, "--model", init, "-o", tmp_path / "r", "--preset", "tiny",
                           "--threads", "1", option, value)
    assert code == 2 and message in err, err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("stage", ["vision", "lm"])
def test_no_feature_cache_is_refused_where_nothing_is_cached(chain: Chain, tmp_path: Path, stage: str) -> None:
    """It was accepted and did nothing: only stages 1 and 2 have a frozen trunk whose features are cached."""
    code, _, err = _invoke("train", stage, chain.manifest, "--model", chain.init, "-o", tmp_path / "r", "--preset",
                           "tiny", "--threads", "1", "--no-feature-cache")
    assert code == 2 and f"--no-feature-cache does not apply to 'train {stage}' (only stages 1 and 2" in err, err
    assert not (tmp_path / "r").exists()


def test_epochs_given_with_the_tiny_preset_are_trained(chain: Chain, tmp_path: Path) -> None:
    """The preset's max_steps won over an explicit --epochs: '--epochs 5' ran 3 epochs."""
    cfg = make_config("stage1", "tiny", epochs=2.0, manifest=str(chain.manifest), init_model=".", out_dir=".")
    assert cfg.max_steps is None and cfg.epochs == 2.0
    assert make_config("stage1", "tiny", manifest=".", init_model=".", out_dir=".").max_steps == 6


@pytest.mark.parametrize("world, stage, micro, accum", [
    (1, "stage2", 16, 4), (4, "stage2", 16, 1), (8, "stage2", 8, 1), (1, "stage1", 32, 8), (4, "stage1", 32, 2)])
def test_the_paper_preset_keeps_the_recipe_global_batch_under_torchrun(monkeypatch: pytest.MonkeyPatch, world: int,
                                                                       stage: str, micro: int, accum: int) -> None:
    """The preset's one-process accumulation was multiplied by the world size: 4 GPUs trained stage 2 at 256, not 64."""
    from radtrt.errors import RadtrtError
    from radtrt.training.data import Schedule

    monkeypatch.setenv("WORLD_SIZE", str(world))
    cfg = make_config(stage, "paper", manifest=".", init_model=".", out_dir=".")
    assert (cfg.micro_batch_size, cfg.grad_accum) == (micro, accum)
    assert Schedule(10**6, cfg.micro_batch_size, cfg.grad_accum, world, 0).global_batch == {"stage1": 256, "stage2": 64}[stage]
    explicit = make_config(stage, "paper", manifest=".", init_model=".", out_dir=".", micro_batch_size=2, grad_accum=3)
    assert (explicit.micro_batch_size, explicit.grad_accum) == (2, 3)  # given both: the user's, as given
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(RadtrtError, match="does not divide among 3 processes"):
        make_config(stage, "paper", manifest=".", init_model=".", out_dir=".")


def test_the_data_plan_is_made_as_the_loader_asks(chain: Chain) -> None:
    """A list of every micro-batch took a minute and 700 MB before step 1 of a long run."""
    import itertools

    from radtrt.training.data import Schedule
    from radtrt.training.loop import _Plan

    schedule = Schedule(16, 2, 2, 1, 0)
    plan = _Plan(schedule, 3, 10**15, 0)  # never materialized: taking the first few is instant
    first = list(itertools.islice(plan, 4))
    assert first == [mb for step in (3, 4) for mb in schedule.micro_batches(step, 0)]


def test_train_eval_checks_every_study_before_generating(chain: Chain, tmp_path: Path) -> None:
    rows = chain.manifest.read_text().splitlines()
    manifest = chain.manifest.parent / "with-missing.jsonl"
    manifest.write_text("\n".join(rows[:2] + [json.dumps({**json.loads(rows[2]), "image": "png/nowhere.png"})]) + "\n")
    code, _, err = _invoke("train", "eval", manifest, "--model", chain.runs["stage2"] / "model", "--max-new-tokens", "4")
    assert code == 2 and f"{manifest}:3: its image is not found" in err and "generating" not in err


def test_train_eval_names_an_unreadable_image_by_its_line(chain: Chain, tmp_path: Path) -> None:
    """Read while generating, an image that cannot be read was named by its path, which may carry a patient's
    name; training names the row's line, and so does eval now."""
    import shutil

    data = Path(shutil.copytree(chain.manifest.parent, tmp_path / "data"))
    rows = (data / chain.manifest.name).read_text().splitlines()
    folder = data / "Doe_Johnathan_MRN998877"
    folder.mkdir()
    (folder / "frontal.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"x" * 50)
    manifest = data / "named.jsonl"
    manifest.write_text("\n".join([rows[0], json.dumps({**json.loads(rows[1]), "image": "Doe_Johnathan_MRN998877"})])
                        + "\n")
    code, _, err = _invoke("train", "eval", manifest, "--model", chain.runs["stage2"] / "model", "--max-new-tokens", "4")
    assert code == 2 and f"{manifest}:2 (its image): " in err and "Doe" not in err, err


def test_train_eval_warns_of_rows_that_are_not_frontal(chain: Chain, tmp_path: Path) -> None:
    """Training warns that a lateral row is not what LLaVA-Rad reads, and infer calls its report unreliable;
    'train eval' scored it without a word."""
    from radtrt.imaging.synthetic import synthetic_chest, write_radiograph

    rows = chain.manifest.read_text().splitlines()
    write_radiograph(chain.manifest.parent / "lateral-eval.dcm", synthetic_chest(seed=3), view_position="LL")
    manifest = chain.manifest.parent / "with-lateral.jsonl"
    manifest.write_text("\n".join([rows[0], json.dumps({**json.loads(rows[1]), "image": "lateral-eval.dcm"})]) + "\n")
    code, _, err = _invoke("train", "eval", manifest, "--model", chain.runs["stage2"] / "model", "--max-new-tokens", "4")
    assert code == 0, err
    assert f"1 manifest row is not a frontal (PA/AP) view (first: {manifest}:2, a LL view)" in err
    code, _, err = _invoke("train", "eval", manifest, "--model", chain.runs["stage2"] / "model", "--max-new-tokens", "4",
                           "--limit", "1")
    assert code == 0 and "not a frontal" not in err, err


def test_a_damaged_run_config_is_one_line_for_convert(chain: Chain, tmp_path: Path) -> None:
    import shutil

    from radtrt.errors import RadtrtError
    from radtrt.training.release_export import export_release

    run = tmp_path / "run"
    shutil.copytree(chain.runs["stage2"], run)
    for text in ("{not json", "[]", "{}", json.dumps({**json.loads((run / "train_config.json").read_text()), "lr": "x"})):
        (run / "train_config.json").write_text(text)
        with pytest.raises(RadtrtError):  # JSONDecodeError / TypeError tracebacks before
            export_release(run, tmp_path / "out")
        assert not (tmp_path / "out").exists()
    config = json.loads((chain.runs["stage2"] / "train_config.json").read_text())
    for key, value, said in (("lr", "fast", "lr must be a number, got str 'fast'"),  # named no field
                             ("lora_r", 4.5, "lora_r must be a whole number, got float 4.5")):
        (run / "train_config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(RadtrtError, match=f"train_config.json is malformed \\({said}\\)"):
            export_release(run, tmp_path / "out")
    del config["lora_alpha"]  # took the default: a release with another LoRA scale than the one trained
    (run / "train_config.json").write_text(json.dumps(config))
    with pytest.raises(RadtrtError, match="train_config.json is incomplete: it lacks lora_alpha"):
        export_release(run, tmp_path / "out")


def test_a_fresh_model_the_host_cannot_hold_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """'train init --arch llava-rad' met the allocator's RuntimeError, or the OOM killer."""
    from radtrt.errors import RadtrtError
    from radtrt.model.tiny import train_tiny_tokenizer
    from radtrt.training import init_model

    monkeypatch.setattr(init_model, "available_bytes", lambda: 10**6)
    with pytest.raises(RadtrtError, match="a fresh 'tiny' model needs about .* GB of memory"):
        init_model.fresh_model("tiny", train_tiny_tokenizer())


def test_a_ct_study_is_refused_with_a_remedy_training_has(chain: Chain, tmp_path: Path) -> None:
    """Training and 'train eval' said 'use --allow-any-modality to override', an option only infer has."""
    from radtrt.imaging.synthetic import radiograph_dataset, synthetic_chest

    rows = [json.loads(line) for line in chain.manifest.read_text().splitlines()]
    ct = tmp_path / "ct.dcm"
    radiograph_dataset(synthetic_chest(seed=3), modality="CT").save_as(ct, enforce_file_format=True)
    rows[0] = {**rows[0], "image": str(ct)}
    for row in rows[1:]:
        row["image"] = str(chain.manifest.parent / row["image"])
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, _, err = _invoke("train", "stage1", manifest, "--model", chain.runs["lm"] / "model", "-o", tmp_path / "r",
                           "--preset", "tiny", "--threads", "1")
    assert code == 2 and "is not a chest radiograph" in err, err
    assert "only 'radtrt infer --allow-any-modality' reads other modalities" in err, err
    code, _, err = _invoke("train", "eval", manifest, "--model", chain.runs["stage2"] / "model", "--limit", "1",
                           "--threads", "1")
    assert code == 2 and "only 'radtrt infer --allow-any-modality' reads other modalities" in err, err
    assert len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("env, message", [
    ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_PORT": "29500"},
     "WORLD_SIZE=2 asks for 2 processes, but MASTER_ADDR is not set: start multi-process training with torchrun"),
    ({"WORLD_SIZE": "x"}, "environment variable WORLD_SIZE='x' is not a whole number"),
    ({"WORLD_SIZE": "2", "LOCAL_RANK": "one"}, "environment variable LOCAL_RANK='one' is not a whole number"),
])
def test_a_broken_torchrun_environment_is_one_line(monkeypatch: pytest.MonkeyPatch, env: dict[str, str],
                                                   message: str) -> None:
    """WORLD_SIZE=2 without MASTER_ADDR, or WORLD_SIZE=x, were tracebacks (torch's ValueError, int()'s)."""
    from radtrt.errors import RadtrtError
    from radtrt.training.distributed import init_distributed

    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(RadtrtError, match=message):
        init_distributed("cpu")


def test_tokenizer_refusals_are_one_line_and_come_before_training(chain: Chain, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A vocabulary too small for the corpus' characters was sentencepiece's RuntimeError traceback; a symlinked
    -o was refused only after the tokenizer had been trained."""
    code, _, err = _invoke("train", "tokenizer", chain.manifest, "-o", tmp_path / "t263", "--vocab-size", "263")
    assert code == 2 and "--vocab-size must be at least 300, got 263" in err, err  # was "too small: ... 259 pieces"
    code, _, err = _invoke("train", "tokenizer", chain.manifest, "-o", tmp_path / "t300", "--vocab-size", "300")
    assert code == 2 and "sentencepiece cannot train a 300-piece tokenizer on this manifest (" in err, err
    assert "give a larger --vocab-size" in err and "--character_coverage" not in err and not (tmp_path / "t300").exists()
    import radtrt.training.tokenizer as tokenizer_module

    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    monkeypatch.setattr(tokenizer_module, "train_tokenizer", lambda *a, **k: pytest.fail("trained before refusing"))
    code, _, err = _invoke("train", "tokenizer", chain.manifest, "-o", tmp_path / "link")
    assert code == 2 and "is a symbolic link" in err and f"e.g. {tmp_path / 'link' / 'out'}" in err, err
