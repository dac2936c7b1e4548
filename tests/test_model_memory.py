"""The memory check before a model load: the lower bound it refuses on, and the cgroup limits it reads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import radtrt.model.loading as loading
from radtrt.errors import RadtrtError
from radtrt.model.loading import anonymous_load_bytes, load_model, save_toolkit
from radtrt.model.memory import available_bytes, cgroup_headroom

from conftest import TinyRelease


def _cgroup(root: Path, group: str, limit: str, current: int, file_cache: int) -> None:
    folder = root / group
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "memory.max").write_text(limit + "\n")
    (folder / "memory.current").write_text(f"{current}\n")
    (folder / "memory.stat").write_text(f"anon {current - file_cache}\nfile {file_cache}\nshmem 0\n")


def test_cgroup_headroom_counts_every_limit_above_the_process(tmp_path: Path) -> None:
    root, proc = tmp_path / "cgroup", tmp_path / "proc-self-cgroup"
    _cgroup(root, "", "max", 9_000, 0)  # the root group: no limit
    _cgroup(root, "docker", "5000", 3_000, 1_000)  # 5000 - 3000 + its reclaimable page cache 1000
    _cgroup(root, "docker/abc", "max", 2_000, 500)
    proc.write_text("0::/docker/abc\n")
    assert cgroup_headroom(root, proc) == [3_000]
    _cgroup(root, "docker/abc", "1000", 900, 100)
    assert cgroup_headroom(root, proc) == [200, 3_000]
    assert available_bytes(root, proc) == 200
    proc.write_text("12:memory:/docker/abc\n")  # cgroup v1 only: no limits read
    assert cgroup_headroom(root, proc) == []
    assert cgroup_headroom(root, tmp_path / "absent") == []
    assert available_bytes(root, tmp_path / "absent") > 0


def test_lower_bound_of_each_layout(tiny_release: TinyRelease, tmp_path: Path) -> None:
    cfg = tiny_release.cfg.decoder
    kv = cfg.num_key_value_heads * cfg.head_dim
    per_layer = cfg.hidden_size * (2 * cfg.hidden_size + 2 * kv) + 3 * cfg.hidden_size * cfg.intermediate_size
    merged = per_layer * cfg.num_hidden_layers  # LLaVA-Rad's adapter targets every linear layer of the decoder
    need = anonymous_load_bytes(tiny_release.release_dir, torch.float32)
    assert need is not None and need[0] == merged * 4 and "LoRA" in need[1]
    assert anonymous_load_bytes(tiny_release.release_dir, torch.float16)[0] == merged * 2

    fp16 = save_toolkit(load_model(tiny_release.release_dir, tiny_release.base_dir), tmp_path / "fp16",
                        dtype=torch.float16)
    numel = sum(p.numel() for p in load_model(fp16, dtype=torch.float16).model.state_dict().values())
    assert anonymous_load_bytes(fp16, torch.float16) is None  # stays memory-mapped
    need = anonymous_load_bytes(fp16, torch.float32)
    assert need is not None and need[0] == numel * 4 and "float16 weights are cast to float32" in need[1]


def test_a_load_that_cannot_fit_is_refused_before_it_starts(tiny_release: TinyRelease, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    fp16 = save_toolkit(load_model(tiny_release.release_dir, tiny_release.base_dir), tmp_path / "fp16",
                        dtype=torch.float16)
    need = anonymous_load_bytes(fp16, torch.float32)[0]
    monkeypatch.setattr(loading, "available_bytes", lambda: need - 1)
    with pytest.raises(RadtrtError, match=r"needs at least .* GB of memory \(its float16 weights are cast"):
        load_model(fp16, dtype=torch.float32)
    merged = anonymous_load_bytes(tiny_release.release_dir, torch.float32)[0]
    monkeypatch.setattr(loading, "available_bytes", lambda: merged - 1)
    with pytest.raises(RadtrtError, match="LoRA adapter is merged"):
        load_model(tiny_release.release_dir, tiny_release.base_dir)
    assert load_model(fp16, dtype=torch.float16).model.language_model.lm_head.weight.dtype == torch.float16
    monkeypatch.setattr(loading, "available_bytes", lambda: need)
    assert load_model(fp16, dtype=torch.float32).model.language_model.lm_head.weight.dtype == torch.float32


def test_export_that_cannot_fit_exits_2_and_writes_nothing(tiny_release: TinyRelease, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from radtrt.cli import app

    fp16 = save_toolkit(load_model(tiny_release.release_dir, tiny_release.base_dir), tmp_path / "fp16",
                        dtype=torch.float16)
    monkeypatch.setattr(loading, "available_bytes", lambda: 1_000)
    out = tmp_path / "bundle"
    result = CliRunner().invoke(app, ["export", "--model", str(fp16), "--precision", "fp32", "-o", str(out)])
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("radtrt: error: loading") and "GB of memory" in lines[-1], result.stderr
    assert "Traceback" not in result.stderr and not out.exists()
