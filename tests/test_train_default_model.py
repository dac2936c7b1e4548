"""The embedded default model: small, loadable, and its reports on fresh phantoms name their findings."""

from __future__ import annotations

import io
from pathlib import Path

import torch
from rich.console import Console

from radtrt.data.labeler import extract_labels, label_f1
from radtrt.data.manifest import read_manifest
from radtrt.data.phantom_set import write_phantom_set
from radtrt.model.loading import load_model
from radtrt.runtime.backends import TorchBackend
from radtrt.runtime.pipeline import Pipeline
from radtrt.model.default_model import default_model_dir


def test_default_model_is_small_and_loads() -> None:
    out = io.StringIO()
    path = default_model_dir(Console(file=out))
    assert "synthetic phantoms" in out.getvalue()
    assert sum(f.stat().st_size for f in path.iterdir()) < 10_000_000
    assert not list(path.glob("*.bin")) and not list(path.glob("*.pt"))
    loaded = load_model(path)
    assert loaded.name == "radtrt-phantom-default" and loaded.model.cfg.conv_template == "v1"
    assert loaded.model.cfg.vision.img_size == 112 and loaded.model.dtype == torch.float32


def test_default_model_reports_name_the_phantom_findings(tmp_path: Path) -> None:
    """Fresh DICOM phantoms (a seed no training set used), through the ``radtrt infer`` pipeline."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        manifest = write_phantom_set(tmp_path / "p", 10, seed=4242, formats=("dicom",))
        loaded = load_model(default_model_dir())
        pipeline = Pipeline(TorchBackend(loaded.model), loaded.tokenizer, loaded.model.cfg, model_name=loaded.name)
        rows = read_manifest(manifest)
        reports = [pipeline.run(manifest.parent / row.image, indication=row.indication, max_new_tokens=120).report
                   for row in rows]
    finally:
        torch.set_num_threads(before)
    assert all(r.endswith(".") for r in reports)  # finished sentences, stopped at </s>
    f1 = label_f1([extract_labels(r) for r in reports], [row.labels for row in rows])
    assert f1.micro_f1 >= 0.7, list(zip(reports, [row.findings for row in rows]))
