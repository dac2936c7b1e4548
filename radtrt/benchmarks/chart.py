"""PNG chart of the stage breakdown: one stacked bar per backend, median seconds per stage.

matplotlib is an optional extra (``radtrt[bench]``); without it the caller skips the PNG and says so
in one line, because a missing chart must not cost the measured numbers.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from radtrt.benchmarks.latency import LatencyReport
from radtrt.errors import fail
from radtrt.outputs import replaced_atomically

CHART_SOFTWARE = "radtrt bench"  # the PNG's Software text chunk: how a later -o knows the file is radtrt's
CHART_STAGES = ("preprocess", "vision", "prefill", "decode")
COLORS = {"preprocess": "#8c8c8c", "vision": "#4c72b0", "prefill": "#dd8452", "decode": "#55a868"}


def stage_medians(report: LatencyReport) -> dict[str, dict[str, float]]:
    """backend -> stage -> median ms over its samples, for the stages the samples have."""
    out = {}
    for b in report.backends:
        out[b.info.name] = {stage: statistics.median(s.timings_ms[stage] for s in b.samples)
                            for stage in CHART_STAGES if b.samples and stage in b.samples[0].timings_ms}
    return out


def matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def write_chart(report: LatencyReport, path: Path) -> Path:
    """Write the PNG whole or not at all; needs matplotlib (check ``matplotlib_available`` first)."""
    try:
        with replaced_atomically(path) as tmp:
            save_chart(report, tmp)
    except OSError as e:
        fail(f"cannot write the chart {path}: {e.strerror or e}")
    return path


def save_chart(report: LatencyReport, file: Path) -> None:
    """Render the PNG into ``file`` as it is (an OSError is the caller's to name: ``radtrt bench`` writes it to a
    temporary name with the rest of its report set), marked as radtrt's so that a later -o may replace it (and
    only it). Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")  # no display; also keeps a GUI backend from being picked up
    import matplotlib.pyplot as plt

    medians = stage_medians(report)
    names = list(medians)
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.6 * len(names)))
    left = [0.0] * len(names)
    shown = 0
    for stage in CHART_STAGES:
        widths = [medians[n].get(stage, 0.0) / 1e3 for n in names]
        if not any(widths):
            continue
        ax.barh(names, widths, left=left, label=stage, color=COLORS[stage])
        left = [a + w for a, w in zip(left, widths)]
        shown += 1
    for y, total in enumerate(left):
        ax.text(total, y, f" {total:.2f} s", va="center", fontsize=8)
    ax.set_xlim(0, max(left, default=1.0) * 1.15 or 1.0)
    ax.set_xlabel("seconds per study (median of each stage, stacked)")
    ax.set_title(f"{report.model}: stage breakdown", fontsize=10)
    ax.invert_yaxis()
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.3), fontsize=8, ncols=max(shown, 1), frameon=False)
    try:
        fig.savefig(file, format="png", dpi=120, bbox_inches="tight", metadata={"Software": CHART_SOFTWARE})
    finally:
        plt.close(fig)
