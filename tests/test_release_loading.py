"""Loading the official release layout: equal to the released loader's algorithm, bad files refused."""

from __future__ import annotations

import json
import shutil
from typing import Callable
from pathlib import Path

import pytest
import torch
import transformers
from peft import PeftModel

from radtrt.errors import RadtrtError
from radtrt.model import checkpoints as ck
from radtrt.model.generate import greedy_generate
from radtrt.model.loading import layout_of, load_model, save_toolkit
from radtrt.model.projector import build_projector
from radtrt.model.prompt import build_prompt, build_query, tokenizer_image_token
from radtrt.model.vision import VisionTransformer

from conftest import TinyRelease, build_tiny_release


def _released_algorithm(rel: TinyRelease, pixels: torch.Tensor, indication: str | None, max_new: int) -> list[int]:
    """What LLaVA-Rad's own code does: HF LLaMA + PeftModel merge, open_clip trunk, splice, HF generate."""
    cfg = rel.cfg
    hf = transformers.LlamaForCausalLM.from_pretrained(rel.base_dir, torch_dtype=torch.float32)
    hf = PeftModel.from_pretrained(hf, rel.release_dir).merge_and_unload().eval()
    ckpt = torch.load(rel.release_dir / "biomedclipcxr_518_checkpoint.pt", weights_only=True)["state_dict"]
    trunk = VisionTransformer(cfg.vision).eval()
    trunk.load_state_dict({k[len("visual.trunk."):]: v for k, v in ckpt.items() if k.startswith("visual.trunk.")})
    non_lora = torch.load(rel.release_dir / "non_lora_trainables.bin", weights_only=True)
    proj = build_projector(cfg.projector_type, cfg.vision.embed_dim, cfg.decoder.hidden_size)
    proj.load_state_dict({k.split("mm_projector.")[1]: v for k, v in non_lora.items()})
    with torch.no_grad():
        feats = proj(trunk.hidden_states(pixels)[cfg.mm_vision_select_layer][:, 1:])[0]
        ids = tokenizer_image_token(build_prompt(build_query(indication)), rel.tokenizer.encode,
                                    rel.tokenizer.bos_token_id)
        pos = ids.index(-200)
        emb = hf.get_input_embeddings()
        embeds = torch.cat([emb(torch.tensor(ids[:pos])), feats, emb(torch.tensor(ids[pos + 1:]))])[None]
        out = hf.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                          do_sample=False, num_beams=1, max_new_tokens=max_new,
                          eos_token_id=rel.tokenizer.eos_token_id, pad_token_id=0)
    return [t for t in out[0].tolist() if t != rel.tokenizer.eos_token_id]


def _ours(model_dir: Path, base: Path | None, pixels: torch.Tensor, indication: str | None, max_new: int) -> list[int]:
    loaded = load_model(model_dir, base)
    m, tok = loaded.model, loaded.tokenizer
    ids = tokenizer_image_token(build_prompt(build_query(indication)), tok.encode, tok.bos_token_id)
    with torch.no_grad():
        embeds = m.embed_multimodal(ids, m.encode_images(pixels)[0])
    return greedy_generate(m.language_model, [embeds], eos_token_id=tok.eos_token_id, max_new_tokens=max_new).token_ids[0]


@pytest.mark.parametrize("indication", [None, "65M with 3 days of cough"])
def test_release_layout_gives_released_algorithms_tokens(tiny_release: TinyRelease, indication: str | None) -> None:
    pixels = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(11))
    ref = _released_algorithm(tiny_release, pixels, indication, 24)
    got = _ours(tiny_release.release_dir, tiny_release.base_dir, pixels, indication, 24)
    assert got == ref
    assert len(set(got)) > 2  # the random model does not just repeat one token


def test_lora_is_merged(tiny_release: TinyRelease) -> None:
    loaded = load_model(tiny_release.release_dir, tiny_release.base_dir)
    q = "language_model.model.layers.0.self_attn.q_proj.weight"
    base = tiny_release.model.state_dict()[q]
    a = tiny_release.lora["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    b = tiny_release.lora["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    torch.testing.assert_close(loaded.model.state_dict()[q], base + 2.0 * b @ a)  # alpha/r = 8/4


def test_adapters_peft_would_merge_otherwise_are_refused(tiny_release: TinyRelease) -> None:
    """Each merged with exit 0 where PEFT's merge_and_unload refuses or merges something else."""
    decoder = ck.strip_prefix(tiny_release.model.state_dict(), ck.DECODER_PREFIX)
    config = json.loads((tiny_release.release_dir / "adapter_config.json").read_text())
    lora = tiny_release.lora
    assert ck.merge_lora(decoder, lora, config).keys() == decoder.keys()  # the adapter as released merges
    with pytest.raises(RadtrtError, match="have rank 4, adapter_config.json says r=8"):  # the scale would be alpha/8
        ck.merge_lora(decoder, lora, {**config, "r": 8})
    with pytest.raises(RadtrtError, match="which its target_modules \\['q_proj'\\] leave out"):  # PEFT merges q only
        ck.merge_lora(decoder, lora, {**config, "target_modules": ["q_proj"]})
    only_q = {k: v for k, v in lora.items() if ".q_proj." in k}
    assert ck.merge_lora(decoder, only_q, {**config, "target_modules": ["q_proj"]})
    assert ck.merge_lora(decoder, only_q, {**config, "target_modules": ".*\\.q_proj"})  # PEFT's regex form
    with pytest.raises(RadtrtError, match="holds no weights"):
        ck.merge_lora(decoder, {}, config)
    with pytest.raises(RadtrtError, match="not floating point"):
        ck.merge_lora(decoder, {k: v.to(torch.int8) for k, v in lora.items()}, config)
    with pytest.raises(RadtrtError, match="sets modules_to_save \\['lm_head'\\], which radtrt's LoRA merge"):
        ck.merge_lora(decoder, lora, {**config, "modules_to_save": ["lm_head"]})  # merged as if unset
    assert ck.merge_lora(decoder, lora, {**config, "modules_to_save": None, "exclude_modules": None})


@pytest.mark.parametrize("exclude", [["model.layers.0.self_attn.q_proj"], ["layers.0.self_attn.q_proj"],
                                     r"model\.layers\.0\.self_attn\.q_proj"])
def test_excluded_modules_are_not_asked_for(tiny_release: TinyRelease, exclude: object) -> None:
    """PEFT writes no pair for a module exclude_modules names: such adapters were refused as incomplete. The rule
    is checked against PEFT's own check_target_module_exists."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    decoder = ck.strip_prefix(tiny_release.model.state_dict(), ck.DECODER_PREFIX)
    config = {**json.loads((tiny_release.release_dir / "adapter_config.json").read_text()), "exclude_modules": exclude}
    lora = {k: v for k, v in tiny_release.lora.items() if ".layers.0.self_attn.q_proj." not in k}
    merged = ck.merge_lora(decoder, lora, config)
    q0 = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(merged[q0], decoder[q0])  # left as it was, as PEFT leaves it
    peft_config = LoraConfig(target_modules=config["target_modules"], exclude_modules=exclude)
    for key in decoder:
        module = key.removesuffix(".weight")
        assert bool(check_target_module_exists(peft_config, module)) == ck._targeted(module, config), module
    with pytest.raises(RadtrtError, match="holds weights for 'model.layers.0.self_attn.q_proj', which its "
                                          "target_modules .* and exclude_modules .* leave out"):
        ck.merge_lora(decoder, tiny_release.lora, config)  # a pair for an excluded module: they disagree
    # no target_modules (PEFT infers them): an excluded module was still asked for
    assert ck.merge_lora(decoder, lora, {**config, "target_modules": None})


def test_an_adapter_missing_targeted_modules_is_refused(tiny_release: TinyRelease, tmp_path: Path) -> None:
    """Half the keys of adapter_model.bin: convert merged the rest with exit 0 (only what was present was checked)."""
    decoder = ck.strip_prefix(tiny_release.model.state_dict(), ck.DECODER_PREFIX)
    config = json.loads((tiny_release.release_dir / "adapter_config.json").read_text())
    lora = tiny_release.lora
    without_down = {k: v for k, v in lora.items() if "layers.1.mlp.down_proj" not in k}
    with pytest.raises(RadtrtError, match="has no weights for 'model.layers.1.mlp.down_proj', which adapter_config"
                                          ".json targets \\(target_modules \\[.*\\]\\): the adapter file is "
                                          "incomplete"):
        ck.merge_lora(decoder, without_down, config)
    with pytest.raises(RadtrtError, match="has no weights for 'model.layers.1.mlp.down_proj'"):  # no target_modules
        ck.merge_lora(decoder, without_down, {k: v for k, v in config.items() if k != "target_modules"})
    no_b = {k: v for k, v in lora.items() if k != "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"}
    with pytest.raises(RadtrtError, match="holds lora_A but not lora_B for 'model.layers.0.self_attn.v_proj'"):
        ck.merge_lora(decoder, no_b, config)  # blamed the base decoder ("wrong base model?")
    release = tmp_path / "release"  # what convert and infer load
    shutil.copytree(tiny_release.release_dir, release)
    keys = sorted(lora)
    torch.save({k: lora[k] for k in keys[: len(keys) // 2]}, release / "adapter_model.bin")
    with pytest.raises(RadtrtError, match="the adapter file is incomplete"):
        load_model(release, tiny_release.base_dir)


def test_layers_to_transform_is_honoured(tiny_release: TinyRelease) -> None:
    """Ignored: every layer the adapter held was merged, and an adapter for some layers could not be checked."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    decoder = ck.strip_prefix(tiny_release.model.state_dict(), ck.DECODER_PREFIX)
    config = {**json.loads((tiny_release.release_dir / "adapter_config.json").read_text()), "layers_to_transform": [0]}
    layer0 = {k: v for k, v in tiny_release.lora.items() if ".layers.0." in k}
    merged = ck.merge_lora(decoder, layer0, config)
    changed = {k for k in decoder if not torch.equal(decoder[k], merged[k])}
    assert changed and all(k.startswith("model.layers.0.") for k in changed)
    with pytest.raises(RadtrtError, match="holds weights for 'model.layers.1.mlp.down_proj', which its target_modules "
                                          ".* in layers_to_transform \\[0\\] leave out"):
        ck.merge_lora(decoder, tiny_release.lora, config)
    with pytest.raises(RadtrtError, match="no weights for 'model.layers.0.self_attn.q_proj'.*layers_to_transform"):
        ck.merge_lora(decoder, {k: v for k, v in layer0.items() if "q_proj" not in k}, config)
    modules = [k.removesuffix(".weight") for k in decoder if k.endswith(".weight")]
    for extra in ({"layers_to_transform": 1}, {"layers_to_transform": [1], "layers_pattern": "layers"},
                  {"layers_to_transform": [0], "layers_pattern": "blocks"}, {"layers_to_transform": []},
                  {"target_modules": ["q_proj", "model.layers.1.mlp.up_proj"], "layers_to_transform": [0]}):
        cfg = {**config, **extra}
        peft_cfg = LoraConfig(target_modules=cfg["target_modules"], layers_to_transform=cfg["layers_to_transform"],
                              layers_pattern=cfg.get("layers_pattern"))
        assert [m for m in modules if ck._targeted(m, cfg)] == [
            m for m in modules if check_target_module_exists(peft_cfg, m)], extra  # PEFT's own rule
    with pytest.raises(RadtrtError, match="layers_to_transform is 'all', not a layer number"):
        ck.merge_lora(decoder, layer0, {**config, "layers_to_transform": "all"})


def test_rank_and_alpha_patterns_are_read_as_peft_reads_them(tiny_release: TinyRelease) -> None:
    """Keys such as 'self_attn.q_proj' or '.*v_proj' matched nothing in an exact lookup: merged at the default
    scale with exit 0 (alpha), or a valid adapter refused for its rank (rank)."""
    from peft import LoraConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict

    hf = transformers.LlamaForCausalLM.from_pretrained(tiny_release.base_dir, torch_dtype=torch.float32)
    decoder = {k: v.clone() for k, v in hf.state_dict().items()}
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"],
                        rank_pattern={"self_attn.q_proj": 4, "layers.1.mlp.down_proj": 3},
                        alpha_pattern={".*v_proj": 32, "layers.0.mlp.down_proj": 1})
    peft_model = get_peft_model(hf, config)
    torch.manual_seed(0)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param)
    adapter = get_peft_model_state_dict(peft_model)
    adapter_config = json.loads(json.dumps(config.to_dict(), default=list))
    expected = peft_model.merge_and_unload().state_dict()
    merged = ck.merge_lora(decoder, adapter, adapter_config)
    changed = [k for k in decoder if not torch.equal(decoder[k], merged[k])]
    assert len(changed) == 3 * len(hf.model.layers)
    for key in decoder:
        torch.testing.assert_close(merged[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)


def test_a_nan_lora_alpha_is_blamed_on_alpha() -> None:
    with pytest.raises(RadtrtError, match="gives 'q_proj' lora_alpha=nan: lora_alpha must be a finite number"):
        ck.lora_scaling({"r": 4, "lora_alpha": float("nan")}, "q_proj")  # said "r must be at least 1"


def test_convert_roundtrip_equals_release(tiny_release: TinyRelease, tmp_path: Path) -> None:
    out = save_toolkit(load_model(tiny_release.release_dir, tiny_release.base_dir), tmp_path / "merged",
                       dtype=torch.float32)
    assert layout_of(out) == "toolkit"
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))
    pixels = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(3))
    assert _ours(out, None, pixels, None, 16) == _ours(tiny_release.release_dir, tiny_release.base_dir, pixels, None, 16)


def test_open_clip_checkpoint_variants() -> None:
    w = torch.ones(2)
    for ckpt in ({"state_dict": {"module.visual.trunk.cls_token": w}}, {"visual.trunk.cls_token": w},
                 {"module.visual.trunk.cls_token": w, "module.text.proj": w}):
        assert list(ck.open_clip_to_trunk(ckpt)) == ["cls_token"]
    with pytest.raises(RadtrtError, match="visual.trunk"):
        ck.open_clip_to_trunk({"state_dict": {"text.proj": w}})


def test_non_lora_prefixes() -> None:
    w = torch.ones(1)
    proj, dec = ck.non_lora_to_projector({"base_model.model.model.mm_projector.0.weight": w,
                                          "base_model.model.model.mm_projector.2.bias": w})
    assert sorted(proj) == ["0.weight", "2.bias"] and dec == {}
    proj, _ = ck.non_lora_to_projector({"model.mm_projector.0.weight": w})
    assert list(proj) == ["0.weight"]


@pytest.fixture()
def broken_copy(tiny_release: TinyRelease, tmp_path: Path) -> TinyRelease:
    rel = TinyRelease(tmp_path / "llava-rad", tmp_path / "base-lm", tiny_release.cfg, tiny_release.model,
                      tiny_release.tokenizer, tiny_release.lora)
    shutil.copytree(tiny_release.release_dir, rel.release_dir)
    shutil.copytree(tiny_release.base_dir, rel.base_dir)
    return rel


def test_missing_file_is_refused(broken_copy: TinyRelease) -> None:
    (broken_copy.release_dir / "non_lora_trainables.bin").unlink()
    with pytest.raises(RadtrtError, match="missing weight file.*non_lora_trainables.bin"):
        load_model(broken_copy.release_dir, broken_copy.base_dir)


@pytest.mark.parametrize("name", ["adapter_model.bin", "biomedclipcxr_518_checkpoint.pt"])
def test_truncated_pickle_is_refused(broken_copy: TinyRelease, name: str) -> None:
    f = broken_copy.release_dir / name
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(RadtrtError, match="truncated or corrupt"):
        load_model(broken_copy.release_dir, broken_copy.base_dir)


def test_truncated_safetensors_is_refused(broken_copy: TinyRelease) -> None:
    f = broken_copy.base_dir / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(RadtrtError, match="truncated or corrupt"):
        load_model(broken_copy.release_dir, broken_copy.base_dir)


def test_base_model_of_wrong_shape_is_refused(tmp_path: Path, tiny_release: TinyRelease) -> None:
    other = build_tiny_release(tmp_path / "other")
    cfg = (other.base_dir / "config.json")
    cfg.write_text(cfg.read_text().replace('"hidden_size": 64', '"hidden_size": 128'))
    with pytest.raises(RadtrtError, match="hidden_size=128"):
        load_model(tiny_release.release_dir, other.base_dir)


def test_base_weights_disagreeing_with_config_are_refused(broken_copy: TinyRelease) -> None:
    from safetensors.torch import load_file, save_file

    f = broken_copy.base_dir / "model.safetensors"
    sd = load_file(f)
    sd["model.layers.1.mlp.up_proj.weight"] = torch.zeros(10, 64)
    save_file(sd, f)
    with pytest.raises(RadtrtError, match="up_proj"):
        load_model(broken_copy.release_dir, broken_copy.base_dir)


def test_release_without_base_model_is_refused(tiny_release: TinyRelease) -> None:
    with pytest.raises(RadtrtError, match="--base-model"):
        load_model(tiny_release.release_dir, None)


def test_malicious_pickle_is_refused(broken_copy: TinyRelease) -> None:
    class Evil:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (print, ("owned",))

    torch.save({"x": Evil()}, broken_copy.release_dir / "non_lora_trainables.bin")
    with pytest.raises(RadtrtError, match="refusing"):
        load_model(broken_copy.release_dir, broken_copy.base_dir)


def test_sharded_pickle_base_model(broken_copy: TinyRelease, tiny_release: TinyRelease) -> None:
    """Vicuna ships sharded ``pytorch_model-0000N-of-0000M.bin`` files with an index."""
    import json

    from safetensors.torch import load_file

    base = broken_copy.base_dir
    sd = load_file(base / "model.safetensors")
    (base / "model.safetensors").unlink()
    names = sorted(sd)
    shards = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    for shard, keys in shards.items():
        torch.save({k: sd[k] for k in keys}, base / shard)
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    (base / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    pixels = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(5))
    assert _ours(broken_copy.release_dir, base, pixels, None, 8) == _ours(
        tiny_release.release_dir, tiny_release.base_dir, pixels, None, 8)


def _edit_json(path: Path, edit: Callable[[dict], None]) -> None:
    d = json.loads(path.read_text())
    edit(d)
    path.write_text(json.dumps(d))


def _edit_pickle(path: Path, edit: Callable[[dict], dict]) -> None:
    torch.save(edit(torch.load(path, weights_only=True)), path)


@pytest.mark.parametrize("damage, match", [  # each was a traceback (ZeroDivisionError, KeyError, AttributeError...)
    (lambda rel: _edit_json(rel / "adapter_config.json", lambda d: d.update(r=0)), "r must be at least 1"),
    (lambda rel: _edit_json(rel / "adapter_config.json", lambda d: d.pop("r")), "no usable r / lora_alpha"),
    (lambda rel: _edit_json(rel / "adapter_config.json", lambda d: d.update(lora_alpha="x")), "no usable r"),
    (lambda rel: _edit_pickle(rel / "adapter_model.bin", lambda d: {1: next(iter(d.values()))}), "not a named tensor"),
    (lambda rel: _edit_pickle(rel / "non_lora_trainables.bin", lambda d: {k: 1 for k in d}), "not a named tensor"),
    (lambda rel: _edit_json(rel / "config.json", lambda d: d.update(num_attention_heads=0)), "must be positive"),
    (lambda rel: _edit_json(rel / "config.json", lambda d: d.update(eos_token_id=[])), "empty list"),
    (lambda rel: _edit_json(rel / "config.json", lambda d: d.update(mm_vision_select_layer="x")), "malformed"),
    (lambda rel: (rel / "adapter_config.json").unlink(), "no adapter_config.json"),  # silently ran the bare base
    (lambda rel: _edit_json(rel / "config.json", lambda d: d.update(hidden_act="gelu")),  # it ran as SiLU
     "hidden_act 'gelu' is not supported"),
    (lambda rel: _edit_json(rel / "config.json", lambda d: d.update(image_aspect_ratio="pad")),  # ran centre-cropped
     "sets image_aspect_ratio='pad'"),
])
def test_damaged_release_files_are_one_line(broken_copy: TinyRelease, damage: Callable[[Path], None],
                                            match: str) -> None:
    damage(broken_copy.release_dir)
    with pytest.raises(RadtrtError, match=match):
        load_model(broken_copy.release_dir, broken_copy.base_dir)


def test_a_weight_map_that_is_not_an_object_is_one_line(tmp_path: Path) -> None:
    from radtrt.model.io import hf_weights

    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["a.safetensors"]}))
    with pytest.raises(RadtrtError, match="'weight_map' is not an object"):  # an AttributeError traceback
        hf_weights(tmp_path)


def _shard(base: Path, edit: Callable[[dict[str, dict[str, torch.Tensor]], dict[str, str]], None]) -> None:
    """Split ``base``'s model.safetensors into two safetensors shards and an index, ``edit`` damaging them first."""
    from safetensors.torch import load_file, save_file

    sd = load_file(base / "model.safetensors")
    (base / "model.safetensors").unlink()
    names = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": {k: sd[k] for k in names[::2]},
              "model-00002-of-00002.safetensors": {k: sd[k] for k in names[1::2]}}
    weight_map = {k: shard for shard, tensors in shards.items() for k in tensors}
    edit(shards, weight_map)
    for shard, tensors in shards.items():
        save_file(tensors, base / shard)
    (base / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


Q0 = "model.layers.0.self_attn.q_proj.weight"


def _duplicate_q0(shards: dict[str, dict[str, torch.Tensor]], weight_map: dict[str, str]) -> None:
    first, second = sorted(shards)
    owner, other = (first, second) if Q0 in shards[first] else (second, first)
    shards[other][Q0] = torch.zeros_like(shards[owner][Q0])


def _drop_shard(shards: dict[str, dict[str, torch.Tensor]], weight_map: dict[str, str]) -> None:
    for name in [n for n, s in weight_map.items() if s == weight_map[Q0]]:
        del weight_map[name]


@pytest.mark.parametrize("edit, match", [
    # read in name order into one dict, the later shard's copy replaced the right one: exit 0, wrong weights
    (_duplicate_q0, f"holds '{Q0}', which it maps to .*a tensor in two shards"),
    (lambda shards, wm: next(t.pop(Q0) for t in shards.values() if Q0 in t),
     f"it maps '{Q0}' to .*which does not hold it"),
    (lambda shards, wm: wm.pop(Q0), f"incomplete index: it does not list '{Q0}'"),
    # Q0 still in its shard, read first: "a tensor in two shards, whose right copy is unknown"
    (lambda shards, wm: wm.update({Q0: "model-00003-of-00002.safetensors"}),
     "^missing weight file: .*/model-00003-of-00002.safetensors$"),
    # said "LoRA adapter targets '...v_proj', which the base decoder does not have (wrong base model?)"
    (_drop_shard, "incomplete index: .*index.json maps no shard to 'model.* and it names no shard model-"),
    # index and shards agree, both without a weight: the base model lacks it (it was called an incomplete index)
    (lambda shards, wm: [wm.pop("model.norm.weight"), *(t.pop("model.norm.weight", None) for t in shards.values())],
     "base model .* lacks the decoder weight 'model.norm.weight'"),
    (lambda shards, wm: [wm.pop("model.norm.weight"), *(t.pop("model.norm.weight", None) for t in shards.values()),
                         shards.update({"consolidated.safetensors": {"x": torch.zeros(1)}})],  # not a shard's name
     "base model .* lacks the decoder weight 'model.norm.weight'"),
    # read from outside the base model folder, exit 0
    (lambda shards, wm: wm.update({n: "../base-lm/" + s for n, s in wm.items()}), "which is not a file of"),
])
def test_shards_that_disagree_with_their_index_are_refused(broken_copy: TinyRelease, edit: Callable,
                                                          match: str) -> None:
    _shard(broken_copy.base_dir, edit)
    with pytest.raises(RadtrtError, match=match):
        load_model(broken_copy.release_dir, broken_copy.base_dir)


def test_safetensors_shards_load_each_name_from_its_shard(broken_copy: TinyRelease, tiny_release: TinyRelease) -> None:
    _shard(broken_copy.base_dir, lambda shards, wm: None)
    pixels = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(5))
    assert _ours(broken_copy.release_dir, broken_copy.base_dir, pixels, None, 8) == _ours(
        tiny_release.release_dir, tiny_release.base_dir, pixels, None, 8)


def test_a_model_folder_given_as_base_model_is_named_as_such(tiny_release: TinyRelease, tmp_path: Path) -> None:
    """'--base-model TOOLKIT_DIR' said 'has hidden_size=4096, LLaVA-Rad expects 64': 4096 is a default, read from a
    config.json that nests the model's sizes under "model"."""
    merged = save_toolkit(load_model(tiny_release.release_dir, tiny_release.base_dir), tmp_path / "merged")
    with pytest.raises(RadtrtError, match="--base-model .*merged is a radtrt model folder, not a base language model"):
        load_model(tiny_release.release_dir, merged)
    with pytest.raises(RadtrtError, match="is a LLaVA-Rad release folder, not a base language model"):
        load_model(tiny_release.release_dir, tiny_release.release_dir)


def test_a_file_or_a_bundle_given_as_base_model_is_named_as_such(tiny_release: TinyRelease, tmp_path: Path) -> None:
    """A file said "base model directory not found" though it exists; a bundle said "missing file: .../config.json",
    where --model names a bundle as one."""
    with pytest.raises(RadtrtError, match=f"--base-model {tiny_release.base_dir / 'config.json'} is a file, not a "
                                          f"directory: .*\\({tiny_release.base_dir}\\?\\)$"):
        load_model(tiny_release.release_dir, tiny_release.base_dir / "config.json")
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    for name in ("manifest.json", "decoder.onnx", "vision.onnx"):
        (bundle / name).write_text("{}")
    with pytest.raises(RadtrtError, match="--base-model .*bundle is an ONNX bundle, not a base language model"):
        load_model(tiny_release.release_dir, bundle)
