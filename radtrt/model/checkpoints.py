"""Pure state-dict transforms between the official LLaVA-Rad release layout and radtrt's model.

Each function takes and returns plain ``{name: tensor}`` dicts (timm's ``filter_fn`` style), so
conversions are testable without files and reusable by the release writer.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch

from radtrt.errors import fail

OPEN_CLIP_TRUNK_PREFIX = "visual.trunk."
VISION_PREFIX = "vision_tower."
PROJECTOR_PREFIX = "mm_projector."
DECODER_PREFIX = "language_model."
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def open_clip_to_trunk(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """timm trunk weights from an open_clip checkpoint (``state_dict`` wrapper and ``module.`` optional)."""
    sd = checkpoint.get("state_dict", checkpoint)
    if not isinstance(sd, dict):
        fail("open_clip checkpoint's 'state_dict' is not a dict")
    trunk = {}
    for key, value in sd.items():
        if not isinstance(key, str):  # not a weight name: nothing of the trunk
            continue
        key = key.removeprefix("module.")
        if key.startswith(OPEN_CLIP_TRUNK_PREFIX) and isinstance(value, torch.Tensor):
            trunk[key[len(OPEN_CLIP_TRUNK_PREFIX):]] = value
    if not trunk:
        fail(f"open_clip checkpoint has no '{OPEN_CLIP_TRUNK_PREFIX}*' weights (is it a timm-trunk model?)")
    return trunk


def trunk_to_open_clip(trunk: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {OPEN_CLIP_TRUNK_PREFIX + k: v for k, v in trunk.items()}


def named_tensors(state: dict[Any, Any], what: str) -> dict[str, torch.Tensor]:
    """``state`` itself, once every entry is checked to be a tensor under a string name (pure).

    Why: a weights-only pickle may hold any plain data; an int key or a number in place of a tensor
    otherwise fails later as an AttributeError deep in the mapping."""
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            fail(f"{what} holds {type(key).__name__} {key!r} -> {type(value).__name__}, not a named tensor")
    return state


def all_finite(tensor: torch.Tensor, chunk: int = 1 << 24) -> bool:
    """No NaN or infinity in ``tensor`` (pure).

    Why a sum first: a NaN or infinity always reaches the sum, and a sum streams at memory speed, while
    ``isfinite`` writes a mask as large as its input (a gigabyte for the 7B embedding table); only a sum that
    overflowed on finite values is settled element by element, in slices."""
    if bool(torch.isfinite(tensor.sum())):
        return True
    return all(bool(torch.isfinite(part).all()) for part in tensor.reshape(-1).split(chunk))


def non_lora_to_projector(non_lora: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split ``non_lora_trainables.bin`` into projector weights and any decoder weights it overrides.

    Same prefix stripping as the released loader: ``base_model.`` then, when keys start with
    ``model.model.``, one ``model.``. Returns (projector state, decoder overrides in HF names).
    """
    sd = {k.removeprefix("base_model."): v for k, v in named_tensors(non_lora, "non_lora_trainables.bin").items()}
    if any(k.startswith("model.model.") for k in sd):
        sd = {k.removeprefix("model."): v for k, v in sd.items()}
    projector, decoder = {}, {}
    for key, value in sd.items():
        if key.startswith("model.mm_projector."):
            projector[key[len("model.mm_projector."):]] = value
        elif key.startswith(("model.vision_tower.", "model.vision_resampler.")):
            continue  # frozen trunk copies: the open_clip checkpoint is the source of truth
        else:
            decoder[key] = value
    if not projector:
        fail("non_lora_trainables.bin holds no 'model.mm_projector.*' weights")
    return projector, decoder


def projector_to_non_lora(projector: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"base_model.model.model.mm_projector.{k}": v for k, v in projector.items()}


def lora_scaling(adapter_config: dict[str, Any], module: str) -> tuple[int, float]:
    """(r, scale) of ``module`` (its full name): ``rank_pattern`` / ``alpha_pattern`` keys are read with PEFT's
    own matcher (a regex over the name's last parts), since a key like ``self_attn.q_proj`` or ``.*q_proj``
    matched nothing in an exact lookup and the adapter merged at the default scale, exit 0."""
    from peft.utils.other import get_pattern_key

    def pick(patterns_key: str, default_key: str) -> Any:
        patterns = adapter_config.get(patterns_key) or {}
        if not isinstance(patterns, dict):
            fail(f"adapter_config.json {patterns_key} is {patterns!r}, not a mapping of module names to values")
        try:
            key = get_pattern_key(list(patterns), module)
        except re.error as e:
            fail(f"adapter_config.json {patterns_key} has a key that is not a regular expression ({e})")
        return patterns[key] if key in patterns else adapter_config[default_key]

    try:
        r = int(pick("rank_pattern", "r"))
        alpha = float(pick("alpha_pattern", "lora_alpha"))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        fail(f"adapter_config.json has no usable r / lora_alpha for '{module}' ({type(e).__name__}: {e})")
    if r < 1:
        fail(f"adapter_config.json gives '{module}' r={r}: r must be at least 1")
    if not math.isfinite(alpha):  # said apart: one message for both blamed r for a NaN alpha
        fail(f"adapter_config.json gives '{module}' lora_alpha={alpha}: lora_alpha must be a finite number")
    return r, alpha / (math.sqrt(r) if adapter_config.get("use_rslora") else r)


def merge_lora(decoder: dict[str, torch.Tensor], adapter: dict[str, torch.Tensor],
               adapter_config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """PEFT's ``merge_and_unload`` for plain LoRA on linear layers: ``W += scale * B @ A``.

    Merged in float32 and cast back, so an fp16 base does not lose the low-rank update's low bits.
    """
    if adapter_config.get("peft_type", "LORA") != "LORA":
        fail(f"adapter type {adapter_config.get('peft_type')} is not supported (only LoRA)")
    if adapter_config.get("fan_in_fan_out") or adapter_config.get("use_dora"):
        fail("LoRA with fan_in_fan_out or DoRA is not supported")
    if adapter_config.get("modules_to_save"):  # PEFT stores whole trained copies of them beside the LoRA pairs
        fail(f"adapter_config.json sets modules_to_save {adapter_config['modules_to_save']!r}, which radtrt's LoRA "
             f"merge does not support (LLaVA-Rad's adapter has none)")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in named_tensors(adapter, "the LoRA adapter weights").items():
        name = key.removeprefix("base_model.model.").replace(".default", "")
        for part in ("lora_A", "lora_B"):
            marker = f".{part}.weight"
            if name.endswith(marker):
                pairs.setdefault(name[: -len(marker)], {})[part] = value
                break
        else:
            fail(f"adapter weight '{key}' is not a LoRA A/B matrix; only plain LoRA adapters are supported")
    if not pairs:  # merging nothing would run the bare base model under the adapter's name
        fail("the LoRA adapter holds no weights")
    merged = dict(decoder)
    for module, ab in sorted(pairs.items()):
        target = module + ".weight"
        if target not in merged:
            fail(f"LoRA adapter targets '{module}', which the base decoder does not have (wrong base model?)")
        if len(ab) != 2:
            fail(f"the LoRA adapter holds {next(iter(ab))} but not {({'lora_A', 'lora_B'} - set(ab)).pop()} for "
                 f"'{module}' (a damaged or cut adapter file?): restore the adapter")
        if not _targeted(module, adapter_config):  # PEFT would leave it unmerged
            fail(f"the LoRA adapter holds weights for '{module}', which its {_targets_said(adapter_config)} leave "
                 f"out: adapter and adapter_config.json disagree")
    # only what is present was checked: an adapter missing half its modules merged the rest with exit 0, a model
    # PEFT never trained (PEFT creates every targeted module's pair, so a complete adapter has them all)
    held_names = {m.rsplit(".", 1)[-1] for m in pairs}  # no target_modules: PEFT's inferred ones are unknown here
    for key, weight in decoder.items():
        module = key.removesuffix(".weight")
        if key == module or weight.dim() != 2 or module in pairs:
            continue
        targeted = _targeted(module, adapter_config) if adapter_config.get("target_modules") is not None \
            else module.rsplit(".", 1)[-1] in held_names and _targeted(module, adapter_config) \
            and _in_layers(module, adapter_config)
        if targeted:
            fail(f"the LoRA adapter has no weights for '{module}', which adapter_config.json targets "
                 f"({_targets_said(adapter_config)}): the adapter file is incomplete (damaged or cut?); restore it")
    for module, ab in sorted(pairs.items()):
        target = module + ".weight"
        base = merged[target]
        if not all(t.is_floating_point() for t in ab.values()):
            fail(f"LoRA weights for '{module}' are {ab['lora_A'].dtype}, not floating point")
        a, b = ab["lora_A"].float(), ab["lora_B"].float()
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != base.shape[1] or b.shape[0] != base.shape[0] \
                or b.shape[1] != a.shape[0]:
            fail(f"LoRA weights for '{module}' have shape {tuple(b.shape)}x{tuple(a.shape)}, the base weight "
                 f"{tuple(base.shape)}: the base model is not the one this adapter was trained on")
        r, scale = lora_scaling(adapter_config, module)
        if a.shape[0] != r:  # the scale alpha / r would be wrong; PEFT refuses the size mismatch
            fail(f"LoRA weights for '{module}' have rank {a.shape[0]}, adapter_config.json says r={r}")
        merged[target] = (base.float() + scale * (b @ a)).to(base.dtype)
    return merged


def _targeted(module: str, adapter_config: dict[str, Any]) -> bool:
    """PEFT's ``check_target_module_exists``: a string is a regex over the whole module name, a list names
    modules by their last parts (then only in ``layers_to_transform``, when given, unless the list names the
    module in full); absent, every module with weights counts (what PEFT infers). ``exclude_modules`` wins: PEFT
    writes no pair for them, so the completeness check must not ask for one."""
    if adapter_config.get("exclude_modules") and _named(module, adapter_config["exclude_modules"], "exclude_modules"):
        return False
    target_modules = adapter_config.get("target_modules")
    if target_modules is None:
        return True
    named = _named(module, target_modules, "target_modules")
    if named == "suffix":
        return _in_layers(module, adapter_config)
    return named is True


def _targets_said(adapter_config: dict[str, Any]) -> str:
    """The adapter config's module selection, as a refusal quotes it (exclude_modules too: it may be the cause)."""
    excluded = adapter_config.get("exclude_modules")
    return (f"target_modules {adapter_config.get('target_modules')!r}{_layers_said(adapter_config)}"
            + (f" and exclude_modules {excluded!r}" if excluded else ""))


def _named(module: str, spec: Any, key: str) -> bool | str:
    """How a PEFT module spec names ``module``: a regex over the whole name (True/False), or a list of names,
    matched in full (True) or by the module's last parts ("suffix")."""
    if isinstance(spec, str):
        try:
            return re.fullmatch(spec, module) is not None
        except re.error as e:
            fail(f"adapter_config.json {key} {spec!r} is not a regular expression ({e})")
    if isinstance(spec, list) and all(isinstance(x, str) for x in spec):
        return True if module in spec else "suffix" if any(module.endswith(f".{x}") for x in spec) else False
    fail(f"adapter_config.json {key} is {spec!r}, not a list of names or a regex")


def _in_layers(module: str, adapter_config: dict[str, Any]) -> bool:
    """Whether ``module`` is in the adapter's ``layers_to_transform`` (PEFT's rule: the first number after
    ``layers_pattern``, or after any name, is the layer). Honoured, not ignored: every layer was merged, so an
    adapter trained on some layers could not be checked for completeness."""
    layers = adapter_config.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    if not (isinstance(layers, int) and not isinstance(layers, bool)) and not (
            isinstance(layers, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in layers)):
        fail(f"adapter_config.json layers_to_transform is {layers!r}, not a layer number or a list of them")
    pattern = adapter_config.get("layers_pattern")
    patterns = [pattern] if isinstance(pattern, str) and pattern else pattern or []
    if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
        fail(f"adapter_config.json layers_pattern is {pattern!r}, not a name or a list of names")
    try:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module) if not patterns else next(
            (m for p in patterns if (m := re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", module))), None)
    except re.error as e:
        fail(f"adapter_config.json layers_pattern {pattern!r} is not a regular expression ({e})")
    if match is None:
        return False
    index = int(match.group("idx"))
    return index == layers if isinstance(layers, int) else index in layers


def _layers_said(adapter_config: dict[str, Any]) -> str:
    layers = adapter_config.get("layers_to_transform")
    return f" in layers_to_transform {layers!r}" if layers not in (None, []) else ""


def with_prefix(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in sd.items()}


def strip_prefix(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
