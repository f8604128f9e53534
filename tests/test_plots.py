"""raypipe.report.plots: the PNGs of a finished run (tiny digits runs on CPU, seconds)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

import raypipe
from raypipe.layout import RunLayout
from raypipe.report.plots import write_plots

QUICK = [
    "initial.epochs=5",
    "retrain.epochs=2",
    "l_ft.epochs=1",
    "f_ft.epochs=1",
    "run.device=cpu",
    "data.max_train_samples=600",
]
ALL_PLOTS = ["plots/p_noisy.png", "plots/mixture.png", "plots/routes.png", "plots/transition_matrix.png"]


def quick_run(out: Path, *overrides: str) -> dict:
    return raypipe.run(raypipe.load_config(None, [*QUICK, *overrides]), str(out), log=lambda _: None)


@pytest.fixture(scope="module")
def loss_run(tmp_path_factory) -> Path:
    """A run with the 1-D `loss` attribution: every plot applies."""
    out = tmp_path_factory.mktemp("plots") / "run"
    quick_run(out, "attribution.rule=loss")
    return out


def assert_png(path: Path, min_size=(400, 300)) -> None:
    assert path.is_file(), path
    assert path.stat().st_size > 10_000, f"{path} is suspiciously small"
    with Image.open(path) as img:
        assert img.format == "PNG"
        img.verify()
    with Image.open(path) as img:
        width, height = img.size
        assert width >= min_size[0] and height >= min_size[1], img.size
        pixels = np.asarray(img.convert("RGB"))
    assert pixels.std() > 10 and (pixels < 128).mean() > 0.005, f"{path} looks blank"


def test_loss_run_writes_all_plots(loss_run: Path):
    report = json.loads((loss_run / "report.json").read_text())
    assert report["plots"] == ALL_PLOTS
    markdown = (loss_run / "report.md").read_text()
    for name in ALL_PLOTS:
        assert_png(loss_run / name)
        assert f"![{name}]({name})" in markdown
    json.loads((loss_run / "partition" / "mixture.json").read_text())  # the plot's input exists


def test_multi_dim_attribution_skips_mixture(loss_run: Path, tmp_path: Path):
    # Resume a copy of the loss run with another rule: data and initial model are reused (fast), the
    # stages from attribution on are redone, and the loss run's mixture.png must not survive.
    out = tmp_path / "run"
    shutil.copytree(loss_run, out)
    assert (out / "plots" / "mixture.png").exists()
    report = quick_run(out, "attribution.rule=grad_x_act_label")
    assert report["attribution"]["rule"] == "grad_x_act_label"
    mixture = json.loads((out / "partition" / "mixture.json").read_text())
    assert mixture["pca"] or len(mixture["means"][0]) > 1
    assert report["plots"] == ["plots/p_noisy.png", "plots/routes.png", "plots/transition_matrix.png"]
    assert json.loads((out / "report.json").read_text())["plots"] == report["plots"]
    markdown = (out / "report.md").read_text()
    for name in report["plots"]:
        assert_png(out / name)
        assert f"![{name}]({name})" in markdown
    assert not (out / "plots" / "mixture.png").exists()
    assert "mixture.png" not in markdown


def test_a_failing_plot_is_logged_and_skipped(loss_run: Path, tmp_path: Path):
    run = tmp_path / "run"
    shutil.copytree(loss_run, run)
    (run / "partition" / "mixture.json").unlink()
    report = json.loads((run / "report.json").read_text())
    messages: list[str] = []
    names = write_plots(RunLayout(str(run)), report, log=messages.append)
    assert names == ["plots/p_noisy.png", "plots/routes.png", "plots/transition_matrix.png"]
    assert len(messages) == 1 and "plots/mixture.png" in messages[0] and "\n" not in messages[0]
    assert not (run / "plots" / "mixture.png").exists()  # the stale copy from the original run is gone


def test_without_ground_truth_and_subset_of_routes(loss_run: Path, tmp_path: Path):
    """A user's data has no corruption mask; a run may have only some routes."""
    run = tmp_path / "run"
    shutil.copytree(loss_run, run)
    for stage in ("attribution", "partition"):
        for shard in (run / stage).glob("part-*.parquet"):
            table = pq.read_table(shard)
            pq.write_table(table.drop_columns(["is_corrupted", "true_label"]), shard)
    report = json.loads((run / "report.json").read_text())
    transition = report.pop("detection")["transition_matrix"]
    report["detection"] = {"transition_matrix": {k: v for k, v in transition.items() if k not in ("true", "error")}}
    report["routes"] = {k: v for k, v in report["routes"].items() if k in ("initial", "f_ft")}
    shutil.rmtree(run / "plots")
    messages: list[str] = []
    assert write_plots(RunLayout(str(run)), report, log=messages.append) == ALL_PLOTS
    assert messages == []
    for name in ALL_PLOTS:
        assert_png(run / name)
    # No transition estimate (no kNN ran): no heatmap, and no stale one left behind.
    report["detection"] = {}
    assert write_plots(RunLayout(str(run)), report) == ALL_PLOTS[:3]
    assert not (run / "plots" / "transition_matrix.png").exists()


def test_no_pyplot_figures_left_open(loss_run: Path, tmp_path: Path):
    import matplotlib.pyplot as plt

    before = len(plt.get_fignums())
    report = json.loads((loss_run / "report.json").read_text())
    run = tmp_path / "run"
    shutil.copytree(loss_run, run)
    assert write_plots(RunLayout(str(run)), report) == ALL_PLOTS
    assert len(plt.get_fignums()) == before
