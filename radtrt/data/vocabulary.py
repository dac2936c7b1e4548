"""The phantom finding vocabulary: what a synthetic radiograph shows, and its label names.

One structured record (``Findings``) drives three things that must agree: the rendered image
(``phantoms``), the report text (``reports``) and the labels (this module). Label names follow
CheXpert's convention that support devices are not pathology: an image with only a tube is still
``no_finding``. Sides are the patient's (on a PA image the patient's left is on the image's right).
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Any, Iterable

from radtrt.errors import fail

SIDES = ("right", "left")
ZONES = ("upper", "lower")
REGIONS = tuple(f"{side} {zone}" for side in SIDES for zone in ZONES)
ETT = "endotracheal tube"
CVC = "central venous catheter"
DEVICES = (ETT, CVC)

NO_FINDING = "no_finding"
LABELS: tuple[str, ...] = (
    NO_FINDING,
    "cardiomegaly",
    "pleural_effusion_right", "pleural_effusion_left",
    "pneumothorax_right", "pneumothorax_left",
    *(f"consolidation_{r.replace(' ', '_')}" for r in REGIONS),
    "nodule_right", "nodule_left",
    "endotracheal_tube", "central_line",
)
DEVICE_LABELS = frozenset({"endotracheal_tube", "central_line"})


def unknown_labels(labels: Iterable[str]) -> list[str]:
    return sorted(set(labels) - set(LABELS))


def pathology_labels(labels: Iterable[str]) -> list[str]:
    """The findings among ``labels``: devices are not findings (a study with only a tube is ``no_finding``)."""
    return [x for x in labels if x not in DEVICE_LABELS and x != NO_FINDING]


def label_set_problem(labels: Iterable[str]) -> str | None:
    """Why ``labels`` is no set of phantom labels (a name outside the vocabulary, ``no_finding`` beside a
    finding), or None: the one rule for phantom manifests and for the truth that ``train eval`` scores against."""
    labels = list(labels)
    unknown = unknown_labels(labels)
    if unknown:
        return f"unknown phantom label(s) {unknown}; known: {', '.join(LABELS)}"
    pathology = pathology_labels(labels)
    if NO_FINDING in labels and pathology:
        return f"labels say both {NO_FINDING} and {pathology[0]}"
    return None


@dataclass(frozen=True)
class Findings:
    """What one phantom shows. Regions are ``"<side> <zone>"``; a nodule may give only its side."""

    cardiomegaly: bool = False
    effusion: tuple[str, ...] = ()  # sides, in SIDES order
    pneumothorax: str | None = None  # side
    consolidation: str | None = None  # region
    nodule: str | None = None  # region, or a side alone when only the side is known (from labels)
    devices: tuple[str, ...] = ()  # in DEVICES order

    def __post_init__(self) -> None:
        problems = [s for s in self.effusion if s not in SIDES] + [d for d in self.devices if d not in DEVICES]
        for value, allowed in ((self.pneumothorax, SIDES), (self.consolidation, REGIONS),
                               (self.nodule, REGIONS + SIDES)):
            if value is not None and value not in allowed:
                problems.append(value)
        if problems:
            fail(f"invalid phantom findings: {problems}")

    @property
    def pathology(self) -> bool:
        return bool(self.cardiomegaly or self.effusion or self.pneumothorax or self.consolidation or self.nodule)

    def labels(self) -> list[str]:
        """The label names, in ``LABELS`` order."""
        out = set()
        if not self.pathology:
            out.add(NO_FINDING)
        if self.cardiomegaly:
            out.add("cardiomegaly")
        out.update(f"pleural_effusion_{side}" for side in self.effusion)
        if self.pneumothorax:
            out.add(f"pneumothorax_{self.pneumothorax}")
        if self.consolidation:
            out.add(f"consolidation_{self.consolidation.replace(' ', '_')}")
        if self.nodule:
            out.add(f"nodule_{self.nodule.split()[0]}")
        if ETT in self.devices:
            out.add("endotracheal_tube")
        if CVC in self.devices:
            out.add("central_line")
        return [label for label in LABELS if label in out]

    @classmethod
    def from_labels(cls, labels: list[str]) -> "Findings":
        """Inverse of :meth:`labels` (a nodule keeps only its side)."""
        problem = label_set_problem(labels)
        if problem:
            fail(problem)

        def side_of(prefix: str) -> list[str]:
            return [s for s in SIDES if f"{prefix}_{s}" in labels]

        consolidation = [r for r in REGIONS if f"consolidation_{r.replace(' ', '_')}" in labels]
        pneumothorax, nodule = side_of("pneumothorax"), side_of("nodule")
        if len(consolidation) > 1 or len(pneumothorax) > 1 or len(nodule) > 1:
            fail("phantom labels allow one consolidation region, one pneumothorax side and one nodule side")
        return cls(cardiomegaly="cardiomegaly" in labels, effusion=tuple(side_of("pleural_effusion")),
                   pneumothorax=(pneumothorax or [None])[0], consolidation=(consolidation or [None])[0],
                   nodule=(nodule or [None])[0],
                   devices=tuple(d for d, lab in ((ETT, "endotracheal_tube"), (CVC, "central_line")) if lab in labels))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Findings":
        return cls(cardiomegaly=bool(d.get("cardiomegaly", False)), effusion=tuple(d.get("effusion", ())),
                   pneumothorax=d.get("pneumothorax"), consolidation=d.get("consolidation"), nodule=d.get("nodule"),
                   devices=tuple(d.get("devices", ())))


def _visible(region: str, effusion: tuple[str, ...]) -> str:
    """The region moved to the upper zone when an effusion on its side would hide the lower one."""
    side, zone = region.split()
    return f"{side} upper" if zone == "lower" and side in effusion else region


def sample_findings(rng: random.Random, p_normal: float = 0.3) -> Findings:
    """A random, anatomically compatible combination; ``p_normal`` of them show nothing at all.

    Compatibility: no pneumothorax on a side with an effusion (one would hide the other in the
    rendering), no lower-zone consolidation or nodule behind an effusion, nodule and consolidation in
    different regions.
    """
    if rng.random() < p_normal:
        return Findings()
    while True:
        cardiomegaly = rng.random() < 0.3
        effusion: tuple[str, ...] = ()
        if rng.random() < 0.3:
            effusion = rng.choice([("right",), ("left",), ("right", "left")])
        pneumothorax = rng.choice(SIDES) if rng.random() < 0.15 else None
        if pneumothorax in effusion:
            pneumothorax = None
        consolidation = _visible(rng.choice(REGIONS), effusion) if rng.random() < 0.3 else None
        nodule = _visible(rng.choice(REGIONS), effusion) if rng.random() < 0.2 else None
        if nodule is not None and nodule == consolidation:
            side, zone = nodule.split()
            nodule = None if zone == "upper" and side in effusion else f"{side} {'lower' if zone == 'upper' else 'upper'}"
        devices: tuple[str, ...] = ()
        if rng.random() < 0.25:
            devices = rng.choice([(ETT,), (CVC,), (ETT, CVC)])
        findings = Findings(cardiomegaly, effusion, pneumothorax, consolidation, nodule, devices)
        if findings.pathology or findings.devices:
            return findings
