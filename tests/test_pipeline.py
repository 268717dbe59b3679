"""`kernelatlas run` end to end (the README's main job) on the real checkpoints of ../shared/weights instead of
the downloaded zoo: extract -> train per depthwise size -> clusters -> assign -> quality + shift -> report, then a
rerun that reuses every step.  Short training (3 epochs) keeps it to seconds; the figures are checked to exist
and to say what the run measured, not for their numbers."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from kernelatlas.cli import main as cli_main

pytest.importorskip("torch")
WEIGHTS = Path(__file__).resolve().parents[1].parent / "shared" / "weights"
pytestmark = pytest.mark.skipif(not WEIGHTS.is_dir(), reason=f"{WEIGHTS} (the shared checkpoints) not present")


def test_run_end_to_end_and_rerun(tmp_path):
    out = tmp_path / "run"
    args = ["run", "--out", str(out), "--zoo", "--src", str(WEIGHTS), "--epochs", "3", "--no-progress"]
    assert cli_main(args) == 0
    report_md = (out / "report" / "report.md").read_text()
    # one model and one assign run per depthwise kernel size with >= 1000 kernels: 3x3 and 5x5 here
    assert sorted(p.name for p in (out / "models").iterdir()) == ["k3", "k5"]
    for k in (3, 5):
        assert (out / "models" / f"k{k}" / "clusters.json").is_file()
    coverage = pd.read_csv(out / "report" / "coverage.csv")
    mbv2 = coverage[coverage["model"].astype(str).str.startswith("mobilenet_v2")]
    assert mbv2[["kernel_size", "kernels"]].values.tolist() == [[3, 7136]]  # its 17 depthwise 3x3 layers
    assert ((coverage["share_0.80"] >= coverage["share_0.85"]) & (coverage["share_0.85"] >= coverage["share_0.90"])).all()
    # the paper's table, its figures, and the CNN Filter DB section
    assert "## Kernel quality and distribution shift" in report_md
    for name in ("coverage-runs.png", "quality-pca-k3.png", "quality-shift-k3-model.png", "quality-shift-k3-depth.png",
                 "quality-models.csv"):
        assert (out / "report" / name).is_file(), name
    assert any(p.name.startswith("layers-k3") for p in (out / "report").iterdir())
    quality = pd.read_csv(out / "report" / "quality-layers.csv")
    assert len(quality) > 50 and quality["n"].sum() > 0
    html = (out / "report" / "report.html").read_text()
    assert 'href="#s' in html and "Kernel quality and distribution shift" in html
    # the rerun reuses the models and the runs: same run ids, models untouched
    stamps = {p: p.stat().st_mtime_ns for p in (out / "models").rglob("autoencoder.safetensors")}
    run_ids = sorted(p.name for p in (out / "corpus" / "runs").iterdir())
    assert cli_main(args) == 0
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert sorted(p.name for p in (out / "corpus" / "runs").iterdir()) == run_ids
