"""First-run demo: a phantom study, an ONNX bundle of the embedded default model, a report.

The default model was trained on synthetic phantoms only; the demo shows the whole pipeline
(DICOM study with a lateral and a frontal view, view selection, preprocessing, ONNX Runtime
vision + decoder, report) on any machine, and prints the phantom's true findings beside it.
"""

from __future__ import annotations

from pathlib import Path

from radtrt.data.manifest import read_manifest as read_phantoms
from radtrt.data.phantom_set import write_phantom_set
from radtrt.errors import RadtrtError, fail
from radtrt.exporter.bundle import bundle_fingerprint, export_bundle
from radtrt.exporter.onnx import GRAPH_REVISION
from radtrt.model.default_model import load_default_model
from radtrt.model.llava_rad import LlavaRad
from radtrt.runtime.ort import OrtBackend


def _check_reusable(backend: OrtBackend, model: LlavaRad) -> None:
    """What the demo exports: the embedded default model, fp32, with this radtrt's graphs. A bundle that opens
    but is another (an INT8 copy put there, the model or graphs of the radtrt before an upgrade) ran without a
    word, and the demo showed that instead."""
    if backend.precision != "fp32":
        fail(f"it is an {backend.precision} bundle, not the demo's fp32 export")
    revision = backend.manifest.get("graph_revision")
    if revision != GRAPH_REVISION:
        fail(f"its graphs are revision {revision}, this radtrt exports revision {GRAPH_REVISION}")
    if backend.weights_id != bundle_fingerprint(model):
        fail("it holds other weights than this radtrt's embedded default model")


def make_demo(out: Path, seed: int = 2) -> tuple[Path, Path, dict]:
    """(bundle dir, study folder, the phantom's manifest row), reusing what an earlier run left in ``out``."""
    bundle = out / "default-model-fp32"
    # loaded outside the bundle's check: a damaged default model was said as a fault of the earlier demo's bundle
    loaded = load_default_model()
    if not (bundle / "manifest.json").is_file():
        export_bundle(loaded, bundle, precision="fp32")
    else:  # an earlier run's, opened as the demo will open it: 'radtrt export' is no remedy for the demo's user
        try:
            _check_reusable(OrtBackend(bundle, provider="cpu"), loaded.model)
        except RadtrtError as e:
            fail(f"the bundle an earlier demo left in {bundle} cannot be used ({e.problem})",
                 remedy="delete it and 'radtrt demo' exports it again")
    phantoms = out / "phantom-study"
    if not (phantoms / "manifest.jsonl").is_file():
        write_phantom_set(phantoms, 1, seed, formats=("dicom",))
    row = read_phantoms(phantoms / "manifest.jsonl")[0].to_json()
    study = row.get("study")
    if not isinstance(study, str) or not (phantoms / study).is_dir():  # another run's set, or edited by hand
        fail(f"{phantoms} holds no DICOM phantom study of radtrt's demo; delete it or choose another -o")
    return bundle, phantoms / study, row
