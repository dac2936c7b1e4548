"""The calibration file: one versioned safetensors file, reusable across exports.

Tensors: ``decoder.input:NAME`` / ``decoder.output:NAME`` (per-channel absmax, the decoder's
``ActivationStats``), ``vision.input:NAME`` / ``vision.output:NAME`` (the same for the trunk and
projector). Metadata (``__metadata__``): ``format`` = ``radtrt-calibration``, ``format_version``,
and ``meta``, a JSON object with the model's config sha256 (the bundle manifest's
``model.config_sha256`` scheme) and a weights fingerprint, the sample list (paths relative to the
data root, file sha256s, whether findings were used and their hash) and its hash, the data root and
source, the preprocessing constants, the method and the tool versions.

The copy an INT8 bundle carries (``without_paths``) names no folder or file: study folders are often
accession numbers or patient IDs, and a bundle travels to other machines and sites.

The pixels are not stored, and an export does not need them: the vision Q/DQ scales come from the
``vision.input`` maxima (``radtrt.exporter.int8_vision``), SmoothQuant and the INT8 KV cache from the
decoder's. The sample list and its hashes record what the statistics were measured on.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from radtrt.calibration.samples import SampleRef, sample_list_hash
from radtrt.calibration.stats import AbsMax, channels, observed_modules
from radtrt.errors import fail
from radtrt.exporter.quant import ActivationStats
from radtrt.model.fingerprint import config_sha256, weights_fingerprint
from radtrt.model.llava_rad import LlavaRad
from radtrt.outputs import make_dir

CALIBRATION_FORMAT = "radtrt-calibration"
CALIBRATION_FORMAT_VERSION = 2  # 2: the sample-list hash leaves the paths out
# "3" was written for one hour of 2026-11-30 (11:22-12:02 UTC) for the same content: read as 2
READABLE_FORMAT_VERSIONS = (str(CALIBRATION_FORMAT_VERSION), "3")
STATS_FORMAT = "radtrt-activation-stats"  # ActivationStats.save's format


@dataclass
class CalibrationFile:
    """Statistics with the metadata that makes them reusable: which samples (by content hash), which model,
    which preprocessing. An export checks all of it, since stale statistics give a wrong INT8 graph quietly."""

    meta: dict[str, Any]
    decoder: ActivationStats
    vision: AbsMax = field(default_factory=AbsMax)

    @property
    def refs(self) -> list[SampleRef]:
        return [SampleRef.from_json(d) for d in self.meta["samples"]]

    @property
    def hash(self) -> str:
        return str(self.meta["sample_list_sha256"])

    @property
    def n(self) -> int:
        return len(self.meta["samples"])

    def summary(self) -> dict[str, Any]:
        """What a bundle manifest records about the calibration it was quantized with (no paths)."""
        return {"hash": self.hash, "n": self.n, "source": self.without_paths().meta["source"],
                "method": self.meta["method"], "created": self.meta["created"]}

    def without_paths(self) -> "CalibrationFile":
        """This file as a bundle carries it: no data root, source path, study or file names; the statistics,
        the images' sha256s and the sample-list hash (which never included the paths) stay."""
        meta = {k: v for k, v in self.meta.items() if k != "data_root"}
        meta["source"] = {k: v for k, v in self.meta["source"].items() if k != "path"}
        meta["samples"] = [{k: v for k, v in s.items() if k not in ("study", "file")} for s in self.meta["samples"]]
        return CalibrationFile(meta, self.decoder, self.vision)

    def save(self, path: Path, *, new: str | None = None) -> Path:
        """Write the file; ``new`` (what it is called in messages) when it must not exist yet (``save_tensors``)."""
        from radtrt.model.io import save_tensors

        tensors = {f"decoder.input:{k}": v for k, v in self.decoder.inputs.items()}
        tensors |= {f"decoder.output:{k}": v for k, v in self.decoder.outputs.items()}
        tensors |= {f"vision.input:{k}": v for k, v in self.vision.inputs.items()}
        tensors |= {f"vision.output:{k}": v for k, v in self.vision.outputs.items()}
        make_dir(path.parent, "folder for the calibration file")
        tensors = {k: v.float().contiguous() for k, v in tensors.items()}
        meta = json.dumps(self.meta)
        save_tensors(tensors, path, metadata={"format": CALIBRATION_FORMAT,
                                              "format_version": str(CALIBRATION_FORMAT_VERSION), "meta": meta,
                                              "content_sha256": content_sha256(meta, tensors)}, new=new)
        return path

    @classmethod
    def load(cls, path: Path) -> "CalibrationFile":
        from radtrt.model.io import load_tensors

        meta_raw = read_metadata(path)
        if meta_raw.get("format") != CALIBRATION_FORMAT:
            fail(f"{path} is not a calibration file of 'radtrt calibrate' (format {meta_raw.get('format')!r}): make one "
                 f"with 'radtrt calibrate --model ... --data STUDIES -o CALIB.safetensors', or give the studies")
        if meta_raw.get("format_version") not in READABLE_FORMAT_VERSIONS:
            fail(f"calibration file {path} has format version {meta_raw.get('format_version')}; this radtrt reads "
                 f"version {CALIBRATION_FORMAT_VERSION}: re-run 'radtrt calibrate'")
        try:
            meta = _checked_meta(json.loads(meta_raw["meta"]), path)
        except (KeyError, json.JSONDecodeError) as e:
            fail(f"calibration file {path} has unreadable metadata ({e})")
        tensors = load_tensors(path)
        # required: a digest that could be left out would let an edited file through by deleting it (files of
        # radtrt before 2026-11-30 09:17 UTC have none and are refused too: their statistics cannot be vouched for)
        if "content_sha256" not in meta_raw:
            fail(f"calibration file {path} records no digest of its statistics (made by an older radtrt, or edited): "
                 f"re-run 'radtrt calibrate' (for a bundle's own calibration.safetensors: export the bundle again, or "
                 f"pass --calibration-stats FILE)")
        if meta_raw["content_sha256"] != content_sha256(meta_raw["meta"], tensors):
            fail(f"calibration file {path}: its statistics or metadata do not match its recorded sha256 (edited or "
                 f"damaged): re-run 'radtrt calibrate'")
        for key, values in tensors.items():
            if not values.is_floating_point() or values.ndim != 1:
                fail(f"calibration file {path}: statistics '{key}' are not a float vector (damaged file?): "
                     f"re-run 'radtrt calibrate'")
            if not bool(torch.isfinite(values).all()) or bool((values < 0).any()):
                fail(f"calibration file {path}: statistics '{key}' hold NaN, infinite or negative values "
                     f"(damaged file?): re-run 'radtrt calibrate'")

        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}

        decoder = ActivationStats(part("decoder.input:"), part("decoder.output:"), describe(meta))
        calib = cls(meta, decoder, AbsMax(part("vision.input:"), part("vision.output:")))
        if sample_list_hash(calib.refs) != calib.hash:
            fail(f"calibration file {path}: its sample list does not match its recorded hash (modified?)")
        return calib

    def check_model(self, model: LlavaRad, path: Path | str = "the calibration file") -> None:
        """Refuse statistics collected on another model (architecture or weights)."""
        if self.meta["model"]["config_sha256"] != config_sha256(model):
            fail(f"{path} was calibrated for another model configuration: re-run 'radtrt calibrate' with this model")
        if self.meta["model"]["weights_fingerprint"] != weights_fingerprint(model):
            fail(f"{path} was calibrated on other weights of this architecture (a float16/bfloat16 copy of a "
                 f"model counts as other weights: its values are rounded): re-run 'radtrt calibrate' with this model")
        vision, decoder = observed_modules(model)
        reached = model.cfg.mm_vision_select_layer % (model.cfg.vision.depth + 1)  # blocks after it never run
        needed = {"vision": [n for n in vision if not n.startswith("vision_tower.blocks.")
                             or int(n.split(".")[2]) < reached], "decoder": list(decoder)}
        for part, stats in (("vision", self.vision), ("decoder", self.decoder)):
            missing = [n for n in needed[part] if n not in stats.inputs or (part == "decoder" and n not in stats.outputs)]
            if missing:  # found here, not when the quantizer looks the module up halfway through an export
                fail(f"{path} has no {part} statistics for '{missing[0]}' ({len(missing)} module(s) missing; "
                     f"damaged file?): re-run 'radtrt calibrate'")
        for stats, modules in ((self.vision, vision), (self.decoder, decoder)):
            for side, table in (("input", stats.inputs), ("output", stats.outputs)):
                for name, values in table.items():
                    if name not in modules:
                        fail(f"{path} holds statistics of '{name}', which this model does not have (damaged file?)")
                    if tuple(values.shape) != (channels(modules[name], side),):
                        fail(f"{path}: the {side} statistics of '{name}' have shape {tuple(values.shape)}, the module "
                             f"has {channels(modules[name], side)} channels (damaged file?): re-run 'radtrt calibrate'")


def content_sha256(meta: str, tensors: dict[str, torch.Tensor]) -> str:
    """A digest of the metadata as stored and every statistic: scales exported from edited maxima (zeroed, or
    a thousand times larger) gave a wrong INT8 graph with exit code 0, and only the sample list was hashed."""
    h = hashlib.sha256(meta.encode())
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].float().contiguous().numpy().tobytes())
    return h.hexdigest()


META_TYPES = {"model": dict, "samples": list, "sample_list_sha256": str, "source": dict, "method": dict, "created": str}


def _checked_meta(meta: Any, path: Path) -> dict[str, Any]:
    """The metadata's structure, checked where it is read: a damaged or hand-edited file fails here in one
    line instead of as a KeyError deep inside an export."""
    if not isinstance(meta, dict):
        fail(f"calibration file {path}: its metadata is not a JSON object (damaged file?): re-run 'radtrt calibrate'")
    for key, kind in META_TYPES.items():
        if not isinstance(meta.get(key), kind):
            fail(f"calibration file {path}: metadata '{key}' is missing or not a JSON {kind.__name__} "
                 f"(damaged file?): re-run 'radtrt calibrate'")
    for key in ("config_sha256", "weights_fingerprint"):
        if not isinstance(meta["model"].get(key), str):
            fail(f"calibration file {path}: metadata 'model.{key}' is missing (damaged file?): re-run 'radtrt calibrate'")
    source = meta["source"]
    if source.get("kind") in ("manifest", "folder"):  # the parity gate finds its held-out samples from these
        if not (isinstance(source.get("path", ""), str) and all(isinstance(source.get(k, 0), int)
                                                                 and not isinstance(source.get(k, 0), bool)
                                                                 for k in ("skip", "n"))):
            fail(f"calibration file {path}: metadata 'source' has a non-text path or non-integer skip/n "
                 f"(damaged file?): re-run 'radtrt calibrate'")
    if not meta["samples"]:
        fail(f"calibration file {path}: it lists no samples (damaged file?): re-run 'radtrt calibrate'")
    for key in ("skip", "n"):
        if isinstance(source.get(key), int) and source[key] < 0:
            fail(f"calibration file {path}: metadata 'source.{key}' is negative (damaged file?): re-run 'radtrt calibrate'")
    for i, sample in enumerate(meta["samples"]):
        if not (isinstance(sample, dict) and isinstance(sample.get("sha256"), str)
                and all(isinstance(sample.get(k, ""), str) for k in ("study", "file"))):
            fail(f"calibration file {path}: sample {i} of its metadata lacks a sha256 or has non-text study/file "
                 f"(damaged file?): re-run 'radtrt calibrate'")
    return meta


def describe(meta: dict[str, Any]) -> str:
    """One line naming the calibration set (recorded into TensorRT-LLM checkpoints)."""
    return (f"radtrt calibration: {len(meta['samples'])} samples, {meta['source'].get('kind')}, "
            f"sample-list sha256 {meta['sample_list_sha256'][:16]}")


def build_meta(*, model: LlavaRad, model_name: str, refs: list[SampleRef], root: Path, source: dict[str, Any],
               method: dict[str, Any], preprocess: dict[str, Any]) -> dict[str, Any]:
    from radtrt.exporter.bundle import tool_versions

    return {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "model": {"name": model_name, "config_sha256": config_sha256(model),
                      "weights_fingerprint": weights_fingerprint(model)},
            "sample_list_sha256": sample_list_hash(refs), "samples": [r.to_json() for r in refs],
            "data_root": str(root.resolve()), "source": source, "method": method, "preprocess": preprocess,
            "tools": tool_versions()}


def read_metadata(path: Path) -> dict[str, str]:
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        fail(f"calibration file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError) as e:
        fail(f"{path} is not a safetensors file ({e})")


def load_activation_stats(path: Path, model: LlavaRad | None = None) -> ActivationStats:
    """Decoder statistics from a ``radtrt calibrate`` file (checked against ``model`` when given) or an
    ``ActivationStats`` file (which records no model)."""
    fmt = read_metadata(path).get("format")
    if fmt == CALIBRATION_FORMAT:
        calibration = CalibrationFile.load(path)
        if model is not None:
            calibration.check_model(model, path)
        return calibration.decoder
    if fmt == STATS_FORMAT:
        return ActivationStats.load(path)
    fail(f"{path} holds neither radtrt calibration data nor activation statistics (format {fmt!r})")
