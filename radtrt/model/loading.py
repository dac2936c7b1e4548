"""Load LLaVA-Rad from the official release layout or from radtrt's merged layout; save the latter.

Release layout (``--model RELEASE_DIR --base-model VICUNA_DIR``), as the released loader reads it:
LLaMA + ``mm_*`` keys in ``config.json``; the base decoder and tokenizer from the Vicuna directory;
``non_lora_trainables.bin`` (projector); ``adapter_*`` (LoRA, merged here); the open_clip JSON and
checkpoint for the trunk. radtrt's merged layout: ``config.json`` (``radtrt_format``),
``model.safetensors``, ``tokenizer.model``, ``tokenizer_config.json`` — no base model, no pickles.
Which layout a directory holds is read from its ``config.json``, never guessed from its path.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from radtrt import __version__
from radtrt.errors import fail, printable, shell_quote
from radtrt.model import checkpoints as ck
from radtrt.model.config import CONV_TEMPLATES, DecoderConfig, LlavaRadConfig, VisionConfig, config_problem
from radtrt.model.decoder import Rotary
from radtrt.model.io import hf_weight_map, hf_weights, load_tensors, read_json, safetensors_header, save_tensors
from radtrt.model.llava_rad import LlavaRad
from radtrt.model.memory import available_bytes
from radtrt.model.prompt import shortest_prompt_length
from radtrt.model.tokenizer import LlamaSPTokenizer
from radtrt.outputs import new_dir_built_aside

TOOLKIT_FORMAT = "radtrt-llava-rad"
TOOLKIT_FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
DEFAULT_VISION_JSON = "biomedclipcxr_518.json"
DEFAULT_VISION_CKPT = "biomedclipcxr_518_checkpoint.pt"
RELEASE_TEMPLATE_KEY = "radtrt_conv_template"  # model/release.py writes it (it imports this module, not the reverse)
RELEASE_NAME_KEY = "radtrt_model_name"  # the same: a radtrt model's name, kept through 'convert --to llava-rad'
# the same: the base decoder's weights' fingerprints (``base_fingerprint``), so a release loaded with another base is
# refused instead of merging its adapter into the wrong weights, which ran silently (LLaVA-Rad's own has none)
RELEASE_BASE_KEY = "radtrt_base_weights_fingerprints"
RELEASE_NAME = "llava-rad"  # a release without it (LLaVA-Rad's own)
# what every training run folder holds (training/loop.py's CONFIG_FILE, training/checkpoint.py's state file)
RUN_CHECKPOINT = "checkpoint/state.pt"
RUN_MARKS = ("train_config.json", RUN_CHECKPOINT)
# a PEFT adapter folder (a stage-2 run's RUN/lora); a release holds them too, beside its config.json
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


@dataclass
class LoadedModel:
    model: LlavaRad
    tokenizer: LlamaSPTokenizer
    name: str
    source: dict[str, Any] = field(default_factory=dict)


# the folders 'radtrt convert --to llava-rad' writes (training/release_export.py), named in load_model's messages
RELEASE_DIR, RELEASE_BASE_DIR = "llava-rad", "base-lm"


def layout_of(model_dir: Path) -> str:
    """``'toolkit'`` or ``'release'``, from the directory's config.json."""
    if not model_dir.is_dir():
        fail(f"{model_dir} is a file, not a model directory" if model_dir.exists() else
             f"model directory not found: {model_dir}")
    if is_bundle(model_dir):  # said as such, not as "missing file: config.json"
        fail(f"{model_dir} is an ONNX bundle, not a model: --model takes the model folder it was exported from "
             f"(commands that run bundles take them as --bundle)")
    if not (model_dir / "config.json").exists() and any((model_dir / mark).is_file() for mark in RUN_MARKS):
        # a training run (radtrt train ... -o RUN) was said as "missing file: RUN/config.json"
        model = model_dir / "model"
        # the command last and bare: quoted inside quotes ('radtrt train resume '/a/my run'') it did not paste
        if model.is_dir():
            fail(f"{model_dir} is a training run folder, not a model: give its model, {model}")
        if not (model_dir / RUN_CHECKPOINT).is_file():  # resume refuses such a run: it was suggested all the same
            fail(f"{model_dir} is a training run folder with neither a model nor a checkpoint yet (it is starting, or "
                 f"it stopped before its first checkpoint, when its training command must be run again): give {model} "
                 f"once it has one")
        fail(f"{model_dir} is a training run folder that has not written its model yet: give {model} once it has; "
             f"to finish it, run: radtrt train resume {shell_quote(str(model_dir))}")
    if holds_release_layout(model_dir):  # "missing file: OUT/config.json"
        fail(f"{model_dir} holds the release layout 'radtrt convert --to llava-rad' writes: give "
             f"{release_options(model_dir)}")
    if not (model_dir / "config.json").exists() and any((model_dir / name).is_file() for name in ADAPTER_FILES):
        fail(_adapter_folder(model_dir))  # said as "missing file: .../config.json"
    cfg = read_json(model_dir / "config.json")
    if cfg.get("radtrt_format") == TOOLKIT_FORMAT:
        return "toolkit"
    if "mm_vision_tower" in cfg:
        return "release"
    if model_dir.name == RELEASE_BASE_DIR and holds_release_layout(model_dir.parent):
        # its LLaMA config.json was "neither a LLaVA-Rad release nor a radtrt model (run 'radtrt convert')", a loop
        fail(f"{model_dir} is the base decoder of the release layout 'radtrt convert --to llava-rad' writes, not a "
             f"model by itself: give {release_options(model_dir.parent)}")
    fail(f"{model_dir} is neither a LLaVA-Rad release (config.json has no mm_vision_tower) "
         f"nor a radtrt model (run 'radtrt convert')")


def holds_release_layout(folder: Path) -> bool:
    """Whether ``folder`` is the OUT of 'radtrt convert --to llava-rad' (OUT/llava-rad + OUT/base-lm), given where
    one of its halves was meant: said as such, not as "missing file: OUT/config.json"."""
    return not (folder / "config.json").exists() and (folder / RELEASE_DIR / "config.json").is_file() \
        and (folder / RELEASE_BASE_DIR).is_dir()


def release_options(folder: Path) -> str:
    """The --model and --base-model that load the release layout written into ``folder``, quoted so that the
    suggestion pastes into a shell (a path with a space was printed bare)."""
    return (f"--model {shell_quote(str(folder / RELEASE_DIR))} "
            f"--base-model {shell_quote(str(folder / RELEASE_BASE_DIR))}")


def is_bundle(folder: Path) -> bool:
    """Whether a folder given as a model (or as studies) is an ONNX bundle (``radtrt export``'s output) instead."""
    return not (folder / "config.json").exists() and (folder / "manifest.json").is_file() \
        and (folder / "decoder.onnx").is_file()


def _adapter_folder(model_dir: Path) -> str:
    """What to give instead of a PEFT LoRA adapter folder (a stage-2 run's RUN/lora, or a copy of one)."""
    run = model_dir.parent
    if any((run / mark).is_file() for mark in RUN_MARKS):
        model = run / "model"
        return (f"{model_dir} is a PEFT LoRA adapter folder, not a model: give its training run's model, {model} "
                f"('radtrt convert --to llava-rad' takes the run folder {run} to publish the adapter)"
                if model.is_dir() else
                f"{model_dir} is a PEFT LoRA adapter folder, not a model, and its training run has not written its "
                f"model yet: give {model} once it has; to finish it, run: radtrt train resume "
                f"{shell_quote(str(run))}")
    return (f"{model_dir} is a PEFT LoRA adapter folder (adapter_config.json), not a model: give the model it belongs "
            f"to, the RUN/model of the 'radtrt train stage2' run that wrote it, or the LLaVA-Rad release folder that "
            f"holds it beside its config.json")


def load_model(model_dir: Path, base_model: Path | None = None, *, dtype: torch.dtype = torch.float32,
               device: str = "cpu") -> LoadedModel:
    """Load either layout; the release layout needs the base Vicuna directory. A model that cannot generate
    (check_generates) is refused here, for every command: export wrote both graphs (minutes at 7B) before its
    ONNX Runtime check failed, and infer said to shorten an --indication it was not given."""
    check_memory(model_dir, dtype)
    if layout_of(model_dir) == "toolkit":
        if base_model is not None:  # said, not ignored: the user may believe the base model is being used
            fail(f"{model_dir} is a radtrt model folder, whose decoder weights are already merged: drop "
                 f"--base-model {base_model}")
        loaded = _load_toolkit(model_dir, dtype)
    else:
        if base_model is None:
            sibling = model_dir.parent / RELEASE_BASE_DIR  # 'radtrt convert --to llava-rad' writes it beside
            fail(f"{model_dir} is the official LLaVA-Rad release layout: pass --base-model with "
                 + (f"the base model written beside it, {sibling}" if model_dir.name == RELEASE_DIR
                    and (sibling / "config.json").is_file() else "the local Vicuna-7B v1.5 directory"))
        loaded = _load_release(model_dir, base_model, dtype)
    check_generates(loaded, str(model_dir), base_model)
    loaded.model.to(device).eval()
    return loaded


def _instantiate(cfg: LlavaRadConfig, state: dict[str, torch.Tensor], dtype: torch.dtype, what: str) -> LlavaRad:
    """Build on the meta device and adopt the tensors, so a 7B model is never held twice in memory."""
    with torch.device("meta"):
        model = LlavaRad(cfg)
    expected = model.state_dict()
    if cfg.decoder.tie_word_embeddings:
        state.setdefault("language_model.lm_head.weight", state.get("language_model.model.embed_tokens.weight"))
    missing = sorted(set(expected) - set(state))
    if missing:
        fail(f"{what}: weight '{missing[0]}' is missing ({len(missing)} missing in all)")
    # weights of a layer or block the config does not have (a config saying fewer layers than the weights hold):
    # the model ran on the first layers only, with exit 0; unrelated extras (a stale rotary buffer) stay ignored
    families = {re.sub(r"\.\d+\.", ".N.", name) for name in expected}
    extra = sorted(name for name in set(state) - set(expected) if re.sub(r"\.\d+\.", ".N.", name) in families)
    if extra:
        fail(f"{what}: weight '{extra[0]}' belongs to no layer of the model config.json describes ({len(extra)} such "
             f"weights): the weights hold more layers or blocks than the config says (mismatched files?)")
    for name, tensor in expected.items():
        if tuple(state[name].shape) != tuple(tensor.shape):
            fail(f"{what}: weight '{name}' has shape {tuple(state[name].shape)}, the config expects "
                 f"{tuple(tensor.shape)} (wrong base model or mismatched files?)")
    adopted = {}
    for name in expected:
        if not state[name].is_floating_point():
            fail(f"{what}: weight '{name}' is stored as {str(state[name].dtype).removeprefix('torch.')}, not a "
                 f"floating-point type (damaged or not a weights file)")
        adopted[name] = state[name].to(dtype)
        if not ck.all_finite(adopted[name]):
            cast = "" if state[name].dtype == dtype else f" once cast to {str(dtype).removeprefix('torch.')}"
            fail(f"{what}: weight '{name}' holds NaN or infinite values{cast} (a diverged training run or a "
                 f"damaged file); refusing to load it")
    model.load_state_dict(adopted, strict=True, assign=True)
    lm = model.language_model.model
    lm.rotary_emb = Rotary(cfg.decoder.head_dim, cfg.decoder.rope_theta)  # non-persistent buffer, rebuilt
    return model


def check_model_name(name: object, what: str) -> str:
    """A model's name is printed in every run's banner and written into SRs and bundles: a newline or escape
    sequence in it faked lines on the terminal, and a non-string one failed in the SR writer after the report."""
    if not isinstance(name, str) or not name.strip() or printable(name) != name:
        fail(f"{what} {name!r} is not a printable model name (text without control characters)")
    return name


def _load_toolkit(model_dir: Path, dtype: torch.dtype) -> LoadedModel:
    meta = read_json(model_dir / "config.json")
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict):
        fail(f"{model_dir}/config.json has no 'model' section: not a radtrt model folder, or damaged")
    if meta.get("format_version") != TOOLKIT_FORMAT_VERSION:
        fail(f"{model_dir} was written by radtrt format {meta.get('format_version')!r}, this radtrt reads "
             f"format {TOOLKIT_FORMAT_VERSION}: re-run 'radtrt convert'")
    cfg = LlavaRadConfig.from_dict(meta["model"], where=f"{model_dir}/config.json")
    model = _instantiate(cfg, load_tensors(model_dir / WEIGHTS_FILE), dtype, str(model_dir))
    tokenizer = LlamaSPTokenizer.from_dir(model_dir)
    _check_vocab(tokenizer, cfg.decoder, model_dir)
    source = meta.get("source", {})
    if not isinstance(source, dict):
        fail(f"{model_dir}/config.json: 'source' is {type(source).__name__}, not an object (damaged?)")
    name = check_model_name(meta["name"], f"{model_dir}/config.json: 'name'") if "name" in meta else model_dir.name
    return LoadedModel(model, tokenizer, name, source)


def cast_on_load(model_dir: Path, dtype: torch.dtype = torch.float32) -> tuple[str, int] | None:
    """(stored dtype, bytes the cast copy takes) when loading a toolkit model as ``dtype`` casts its weights,
    else None. Why: weights already in ``dtype`` stay memory-mapped from the file; cast ones are a full
    in-memory copy (27 GB at 7B in fp32), which decides whether an export fits the machine."""
    if layout_of(model_dir) != "toolkit" or not (model_dir / WEIGHTS_FILE).is_file():
        return None
    header = safetensors_header(model_dir / WEIGHTS_FILE)
    stored = {stored_dtype for stored_dtype, _ in header.values()}
    numel = sum(int(torch.Size(shape).numel()) for _, shape in header.values())
    target = str(dtype).removeprefix("torch.")
    names = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
    stored_names = {names.get(s, s) for s in stored}
    if stored_names == {target}:
        return None
    return "/".join(sorted(stored_names)), numel * torch.finfo(dtype).bits // 8


def anonymous_load_bytes(model_dir: Path, dtype: torch.dtype) -> tuple[int, str] | None:
    """A lower bound on the weight bytes loading ``model_dir`` as ``dtype`` holds outside the files' memory
    maps, and why; None when the weights can stay mapped. Why a lower bound: refusing on it is never wrong."""
    dtype_name = str(dtype).removeprefix("torch.")
    if layout_of(model_dir) == "toolkit":
        cast = cast_on_load(model_dir, dtype)
        return None if cast is None else (cast[1], f"its {cast[0]} weights are cast to {dtype_name}")
    adapter_file = model_dir / "adapter_config.json"
    targets = read_json(adapter_file).get("target_modules") if adapter_file.is_file() else None
    if not isinstance(targets, list):  # no adapter, or a regex: nothing certain to count
        return None
    cfg, _ = release_config(model_dir)
    with torch.device("meta"):
        layers = LlavaRad(cfg).language_model.model.layers
    numel = sum(module.weight.numel() for name, module in layers.named_modules()
                if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets)
    return numel * torch.finfo(dtype).bits // 8, f"the LoRA adapter is merged into {dtype_name} copies of its weights"


MEMORY_REMEDY = "free memory or use a larger host"  # told apart by the default model's loader (no damage)


def check_memory(model_dir: Path, dtype: torch.dtype) -> None:
    need = anonymous_load_bytes(model_dir, dtype)
    if need is None:
        return
    have = available_bytes()
    if need[0] > have:
        fail(f"loading {model_dir} needs at least {need[0] / 1e9:.1f} GB of memory ({need[1]}); this host has "
             f"{have / 1e9:.1f} GB available", remedy=MEMORY_REMEDY)


def check_generates(loaded: LoadedModel, what: str, base_model: Path | None = None) -> None:
    """Refuse a model whose decoder positions cannot hold its shortest prompt (no indication, the image tokens
    counted) and one new token: convert wrote one (max_position_embeddings 10) with exit 0, and every infer of it
    then failed. load_model applies it to every model it loads; a model built in memory (training's release
    export) is checked before it is written. Training refuses such a model the same way (loop.py's
    _check_max_length)."""
    cfg = loaded.model.cfg
    length = shortest_prompt_length(loaded.tokenizer.encode, loaded.tokenizer.bos_token_id, cfg.conv_template,
                                    cfg.num_image_tokens)
    positions = cfg.decoder.max_position_embeddings
    if length + 1 <= positions:
        return
    base_positions = None
    if base_model is not None and (base_model / "config.json").is_file():
        base_positions = read_json(base_model / "config.json").get("max_position_embeddings")
    base = (f"; its base model {base_model} has {base_positions}" if isinstance(base_positions, int)
            and base_positions != positions else "")
    fail(f"{what} cannot generate a report: its decoder has {positions} positions (max_position_embeddings), and its "
         f"shortest prompt takes {length} with the {cfg.num_image_tokens} image tokens, before any new token{base} "
         f"(a damaged or hand-edited config.json?)")


def _check_vocab(tokenizer: LlamaSPTokenizer, cfg: DecoderConfig, where: Path) -> None:
    if tokenizer.vocab_size > cfg.vocab_size:
        fail(f"tokenizer in {where} has {tokenizer.vocab_size} tokens, the decoder only {cfg.vocab_size}")


def release_config(release_dir: Path) -> tuple[LlavaRadConfig, dict[str, Any]]:
    """radtrt config from a release ``config.json`` (parsed here: transformers' llava class differs)."""
    hf = read_json(release_dir / "config.json")
    if not isinstance(hf, dict):
        fail(f"{release_dir}/config.json is not a JSON object")
    vision_json = hf.get("mm_vision_tower_config") or DEFAULT_VISION_JSON
    if isinstance(vision_json, str):
        vision_json = read_json(release_dir / Path(vision_json).name)
    if not isinstance(vision_json, dict):
        fail(f"{release_dir}/config.json: mm_vision_tower_config is neither a file name nor a JSON object")
    for key, allowed in (("mm_use_im_start_end", (False, None)), ("mm_use_im_patch_token", (False, None))):
        if hf.get(key) not in allowed:
            fail(f"{release_dir}/config.json sets {key}={hf.get(key)}; LLaVA-Rad uses neither image start/end "
                 f"nor patch tokens and radtrt supports only that")
    # LLaVA's "pad" (expand2square) and "anyres" pad or tile the image; radtrt centre-crops as "square" (the
    # release's value) does, so another value was accepted and ignored
    if hf.get("image_aspect_ratio") not in ("square", None):
        fail(f"{release_dir}/config.json sets image_aspect_ratio={hf.get('image_aspect_ratio')!r}; LLaVA-Rad uses "
             f"'square' (resize and centre crop) and radtrt supports only that")
    template = hf.get(RELEASE_TEMPLATE_KEY, "v1")  # written by 'radtrt convert --to llava-rad'; the release's is v1
    if template not in CONV_TEMPLATES:
        fail(f"{release_dir}/config.json: {RELEASE_TEMPLATE_KEY} {template!r} is not a conversation template "
             f"radtrt knows ({', '.join(CONV_TEMPLATES)})")
    try:  # a field of the wrong kind anywhere in the two JSON files
        cfg = LlavaRadConfig(
            conv_template=template,
            vision=VisionConfig.from_open_clip(vision_json),
            decoder=DecoderConfig.from_hf(hf),
            projector_type=hf.get("mm_projector_type", "linear"),
            mm_vision_select_layer=int(hf.get("mm_vision_select_layer", -2)),
            mm_vision_select_feature=hf.get("mm_vision_select_feature", "patch"),
        )
    except (TypeError, ValueError, AttributeError, IndexError, KeyError, ZeroDivisionError) as e:
        fail(f"{release_dir}: config.json or its vision tower JSON is malformed ({type(e).__name__}: {e})")
    problem = config_problem(cfg)
    if problem:
        fail(f"{release_dir}: config.json or its vision tower JSON is malformed ({problem})")
    if hf.get("mm_hidden_size", cfg.vision.embed_dim) != cfg.vision.embed_dim:
        fail(f"config.json mm_hidden_size {hf['mm_hidden_size']} disagrees with the vision trunk width "
             f"{cfg.vision.embed_dim}")
    return cfg, hf


def _load_release(release_dir: Path, base_dir: Path, dtype: torch.dtype) -> LoadedModel:
    cfg, hf = release_config(release_dir)
    if not base_dir.is_dir():
        if not base_dir.exists():
            fail(f"base model directory not found: {base_dir}")
        # a file was said as "directory not found", though it exists
        hint = f" ({base_dir.parent}?)" if base_dir.name == "config.json" else ""
        fail(f"--base-model {base_dir} is a file, not a directory: give the Hugging Face LLaMA folder (Vicuna-7B "
             f"v1.5) the release was trained on{hint}")
    if not (base_dir / "config.json").exists() and any((base_dir / mark).is_file() for mark in RUN_MARKS):
        fail(f"--base-model {base_dir} is a radtrt training run folder, not a base language model: give the "
             f"Hugging Face LLaMA folder (Vicuna-7B v1.5) the release was trained on")
    if holds_release_layout(base_dir):  # "missing file: OUT/config.json"
        fail(f"--base-model {base_dir} holds the release layout 'radtrt convert --to llava-rad' writes, not a base "
             f"language model: give {release_options(base_dir)}")
    if is_bundle(base_dir):  # said as "missing file: .../config.json", as --model was
        fail(f"--base-model {base_dir} is an ONNX bundle, not a base language model: give the Hugging Face LLaMA "
             f"folder (Vicuna-7B v1.5) the release was trained on")
    base_hf = read_json(base_dir / "config.json")
    if not isinstance(base_hf, dict):
        fail(f"{base_dir}/config.json is not a JSON object")
    # their config.json read as a LLaMA one gave 'hidden_size=4096' (DecoderConfig's default: a radtrt model nests
    # its sizes under "model"), a misleading reason
    kind = ("a radtrt model folder" if base_hf.get("radtrt_format") == TOOLKIT_FORMAT
            else "a LLaVA-Rad release folder" if "mm_vision_tower" in base_hf else None)
    if kind is not None:
        fail(f"--base-model {base_dir} is {kind}, not a base language model: give the Hugging Face LLaMA "
             f"(Vicuna-7B v1.5) directory the release was built on, e.g. the base-lm/ that 'radtrt convert --to "
             f"llava-rad' writes beside llava-rad/")
    base_cfg = DecoderConfig.from_hf(base_hf)
    problem = config_problem(LlavaRadConfig(decoder=base_cfg))
    if problem:
        fail(f"base model {base_dir}/config.json is malformed ({problem})")
    for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if getattr(base_cfg, name) != getattr(cfg.decoder, name):
            fail(f"base model {base_dir} has {name}={getattr(base_cfg, name)}, LLaVA-Rad expects "
                 f"{getattr(cfg.decoder, name)}: point --base-model at Vicuna-7B v1.5")
    decoder, index = hf_weights(base_dir)
    names = decoder_weight_names(cfg)
    fingerprint = base_fingerprint(names, decoder)  # of the base's own weights, before the release overrides any
    projector, overrides = ck.non_lora_to_projector(load_tensors(release_dir / "non_lora_trainables.bin"))
    decoder.update(overrides)
    _check_base_weights(names, decoder, base_dir, index)  # first: a damaged base is named as such, not as another
    _check_base_fingerprint(hf, fingerprint, release_dir, base_dir)
    adapter_cfg_file = release_dir / "adapter_config.json"
    adapter_file = next((release_dir / n for n in ("adapter_model.safetensors", "adapter_model.bin")
                         if (release_dir / n).is_file()), None)
    if adapter_file is not None and not adapter_cfg_file.is_file():  # merging nothing would run the bare base
        fail(f"{release_dir} has {adapter_file.name} but no adapter_config.json to merge it with")
    if adapter_cfg_file.is_file():
        decoder = ck.merge_lora(decoder, load_tensors(adapter_file or release_dir / "adapter_model.bin"),
                                read_json(adapter_cfg_file))
    vision_ckpt = Path(hf.get("mm_vision_tower_checkpoint") or DEFAULT_VISION_CKPT).name
    trunk = ck.open_clip_to_trunk(load_tensors(release_dir / vision_ckpt))
    state = {**ck.with_prefix(trunk, ck.VISION_PREFIX), **ck.with_prefix(projector, ck.PROJECTOR_PREFIX),
             **ck.with_prefix(decoder, ck.DECODER_PREFIX)}
    model = _instantiate(cfg, state, dtype, f"{release_dir} + {base_dir}")
    tokenizer = LlamaSPTokenizer.from_dir(base_dir)
    _check_vocab(tokenizer, cfg.decoder, base_dir)
    source = {"layout": "llava-rad-release", "model_dir": release_dir.name, "base_model_dir": base_dir.name,
              "base_model": hf.get("_name_or_path", "")}
    name = hf.get(RELEASE_NAME_KEY)
    if name is not None:
        check_model_name(name, f"{release_dir}/config.json: {RELEASE_NAME_KEY}")
    return LoadedModel(model, tokenizer, name or RELEASE_NAME, source)


def decoder_weight_names(cfg: LlavaRadConfig) -> set[str]:
    """The weights a base decoder must hold for ``cfg`` (a tied ``lm_head`` is the embedding table)."""
    with torch.device("meta"):
        expected = set(LlavaRad(cfg).language_model.state_dict())
    if cfg.decoder.tie_word_embeddings:
        expected.discard("lm_head.weight")
    return expected


def base_fingerprint(names: Iterable[str], decoder: Mapping[str, torch.Tensor]) -> list[str | None]:
    """A base decoder's weights fingerprinted one by one (float16 resolution, 16 hex digits each, in the order of
    their sorted names), as 'radtrt convert --to llava-rad' records them and a release's loader checks them: over
    the weights the model uses (a stale rotary buffer an older save left is no difference), None for one absent or
    held in neither float32 nor float16, whose float16 casts alone are exact (a bfloat16 copy of the right base
    read as another base). One by one, so that a base with some tensors in bfloat16 is still checked on the rest."""
    from radtrt.model.fingerprint import tensors_fingerprint

    def one(name: str) -> str | None:
        t = decoder.get(name)
        if t is None or t.dtype not in (torch.float32, torch.float16):
            return None
        return tensors_fingerprint({name: t}, dtype=torch.float16)[:16]

    return [one(name) for name in sorted(names)]


def _check_base_fingerprint(hf: dict[str, Any], fingerprint: list[str | None], release_dir: Path,
                            base_dir: Path) -> None:
    """A release 'radtrt convert --to llava-rad' wrote names its base decoder's weights; another base of the same
    shape (another training's base-lm/) merged the adapter into the wrong weights with exit 0. Weights held in
    another precision cannot be compared exactly, and are not (``base_fingerprint``)."""
    recorded = hf.get(RELEASE_BASE_KEY)
    if recorded is None:
        return
    if not isinstance(recorded, list) or len(recorded) != len(fingerprint) or \
            not all(r is None or isinstance(r, str) for r in recorded):
        fail(f"{release_dir}/config.json: {RELEASE_BASE_KEY} is not one fingerprint per decoder weight (damaged "
             f"or hand-edited?)")
    if any(r is not None and f is not None and r != f for r, f in zip(recorded, fingerprint)):
        fail(f"--base-model {base_dir} is not the base decoder {release_dir} was written with (its weights differ "
             f"from the fingerprints in config.json): give the base-lm/ folder written beside it")


def _check_base_weights(expected: set[str], decoder: dict[str, torch.Tensor], base_dir: Path,
                        index: Path | None) -> None:
    """Refuse a base decoder that lacks weights before the LoRA merge, whose message ("targets '...v_proj', which
    the base decoder does not have (wrong base model?)") misled when a shard index merely omitted names."""
    missing = sorted(expected - set(decoder))
    if not missing:
        return
    unindexed = _unindexed_shards(index) if index is not None else []
    if unindexed:  # a weight file the index leaves out: the index is short
        fail(f"incomplete index: {index} maps no shard to '{missing[0]}' ({len(missing)} decoder weights unmapped, "
             f"and it names no shard {unindexed[0]}; damaged or hand-edited index?)")
    fail(f"base model {base_dir} lacks the decoder weight '{missing[0]}' ({len(missing)} missing in all; wrong base "
         f"model or damaged file?)")


def _unindexed_shards(index: Path) -> list[str]:
    """Weight files beside ``index`` (of its own format) that it maps no tensor to. With none, a weight the index
    does not list is one no shard holds (every held tensor was checked against the index): the base model lacks
    it, and "incomplete index" sent the user to the wrong file."""
    shard = re.compile(r"model-\d{5}-of-\d{5}\.safetensors" if index.name.startswith("model.safetensors") else
                       r"pytorch_model-\d{5}-of-\d{5}\.bin")  # Hugging Face's shard names, not a stray adapter's
    listed = set(hf_weight_map(index).values())
    return sorted(p.name for p in index.parent.iterdir() if shard.fullmatch(p.name) and p.name not in listed)


def save_toolkit(loaded: LoadedModel, out_dir: Path, *, dtype: torch.dtype | None = None) -> Path:
    """Write radtrt's merged layout: later runs need neither the base model nor pickles. Built beside ``out_dir``
    (new or empty) and renamed into place: an interrupted or failed write (a full disk) leaves no half model
    under the name, which a later run would take for a finished one."""
    state = {k: (v.to(dtype) if dtype and v.is_floating_point() else v).cpu()
             for k, v in loaded.model.state_dict().items()}
    if loaded.model.cfg.decoder.tie_word_embeddings:
        state.pop("language_model.lm_head.weight", None)
    meta = {"radtrt_format": TOOLKIT_FORMAT, "format_version": TOOLKIT_FORMAT_VERSION, "radtrt_version": __version__,
            "name": loaded.name, "source": loaded.source, "model": loaded.model.cfg.to_dict()}
    with new_dir_built_aside(out_dir, "model folder") as work:
        save_tensors(state, work / WEIGHTS_FILE, metadata={"format": TOOLKIT_FORMAT})
        try:
            loaded.tokenizer.save(work)
            (work / "config.json").write_text(json.dumps(meta, indent=2))
        except OSError as e:
            fail(f"cannot write model folder {out_dir}: {e.strerror or e}")
    return out_dir
