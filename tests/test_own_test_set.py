"""A user's own data: a separate trusted test table (data.test_path), known true labels (data.true_label_column),
both checked before any work, and the report saying which labels each accuracy was measured against."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raypipe.cli import summary_lines
from raypipe.config import Config, DataConfig, NoiseConfig, load_config
from raypipe.data import injected_noise, labels_of_test_split, load_splits
from raypipe.errors import ConfigError
from raypipe.stages.data import ground_truth


def _table(path, n, seed, classes=3, extra=None):
    rng = np.random.default_rng(seed)
    label = np.arange(n) % classes
    image = (rng.random((n, 4)) + label[:, None]).astype(np.float32) / classes
    columns = {"image": pa.array(list(image)), "label": pa.array(label), **(extra or {})}
    pq.write_table(pa.table(columns), path)
    return path, label


def test_a_separate_test_table_is_the_test_split_whole(tmp_path):
    train_path, _ = _table(tmp_path / "train.parquet", 90, 0)
    test_path, test_label = _table(tmp_path / "test.parquet", 21, 1)
    cfg = DataConfig(source="parquet", path=str(train_path), test_path=str(test_path), val_fraction=0.1)
    splits = load_splits(cfg)
    assert len(splits["test"]) == 21 and len(splits["train"]) + len(splits["val"]) == 90  # nothing cut for test
    np.testing.assert_array_equal(splits["test"].label, test_label)
    assert set(splits["test"].sample_id).isdisjoint(splits["train"].sample_id)  # ids kept apart
    assert "data.test_path" in labels_of_test_split(cfg) and "as given" in labels_of_test_split(cfg)


def test_a_test_table_with_its_own_label_column(tmp_path):
    train_path, _ = _table(tmp_path / "train.parquet", 60, 0)
    rng = np.random.default_rng(2)
    relabelled = rng.integers(0, 3, 15)
    test_path, _ = _table(tmp_path / "test.parquet", 15, 1, extra={"clean_label": pa.array(relabelled)})
    cfg = DataConfig(source="parquet", path=str(train_path), test_path=str(test_path), test_label_column="clean_label")
    np.testing.assert_array_equal(load_splits(cfg)["test"].label, relabelled)


def test_true_labels_mark_the_corrupted_samples_and_label_the_cut_test_split(tmp_path):
    n = 100
    true = np.arange(n) % 3
    given = true.copy()
    given[::5] = (given[::5] + 1) % 3  # every fifth label wrong
    path, _ = _table(tmp_path / "noisy.parquet", n, 0, extra={"true": pa.array(true)})
    table = pq.read_table(path).set_column(1, "label", pa.array(given))
    pq.write_table(table, path)
    cfg = DataConfig(source="parquet", path=str(path), true_label_column="true")
    splits = load_splits(cfg)
    for name in ("train", "val"):
        s = splits[name]
        np.testing.assert_array_equal(s.is_corrupted, s.sample_id % 5 == 0)
        np.testing.assert_array_equal(s.true_label, true[s.sample_id])
    test = splits["test"]
    np.testing.assert_array_equal(test.label, true[test.sample_id])  # scored against the true labels
    assert not test.is_corrupted.any()
    assert "data.true_label_column 'true'" in labels_of_test_split(cfg)
    assert "true labels" in ground_truth(cfg, NoiseConfig(kind="none"))


def test_ground_truth_is_unknown_for_own_data_without_noise_or_true_labels(tmp_path):
    cfg = DataConfig(source="parquet", path="t.parquet")
    assert ground_truth(cfg, NoiseConfig(kind="none")) is None
    assert "as noisy as the data" in labels_of_test_split(cfg)
    assert "symmetric noise" in ground_truth(cfg, NoiseConfig(kind="symmetric", rate=0.2))
    assert "clean labels" in labels_of_test_split(DataConfig())


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["data.test_path=/t.parquet"], "config key 'data.test_path': is read only with data.source=parquet"),
        (["data.true_label_column=t"], "config key 'data.true_label_column'"),
        (["data.source=parquet", "data.path=/a", "data.test_label_column=y"], "config key 'data.test_label_column'"),
        (["data.source=parquet", "data.path=/a", "data.true_label_column=label"], "also data.label_column"),
    ],
)
def test_bad_settings_are_refused_when_the_config_is_read(overrides, needle):
    with pytest.raises(ConfigError) as refused:
        load_config(None, overrides)
    assert needle in str(refused.value) and "\n" not in str(refused.value)


def test_a_missing_test_table_is_named_by_its_key(tmp_path):
    from raypipe.errors import DataError

    train_path, _ = _table(tmp_path / "train.parquet", 30, 0)
    cfg = DataConfig(source="parquet", path=str(train_path), test_path=str(tmp_path / "nope.parquet"))
    with pytest.raises(DataError, match="data.test_path"):
        load_splits(cfg)


def test_a_missing_local_test_table_stops_the_cli_before_any_work(tmp_path, capsys):
    from raypipe.cli import main

    train_path, _ = _table(tmp_path / "train.parquet", 30, 0)
    out = tmp_path / "run"
    argv = ["run", "--out", str(out), "data.source=parquet", f"data.path={train_path}", "data.test_path=/no/test"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: config key 'data.test_path': '/no/test' does not exist") and err.count("\n") == 1
    assert not out.exists()


SHIPPED_CONFIGS = sorted(str(p) for p in (Path(__file__).resolve().parents[1] / "jobs" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("config_file", [None, *SHIPPED_CONFIGS])
def test_own_table_gets_no_noise_from_the_defaults_or_a_shipped_config(config_file):
    from raypipe.sweep import SweepJobConfig

    schema = SweepJobConfig if config_file and config_file.endswith("_sweep.yaml") else Config
    cfg = load_config(config_file, ["data.source=parquet", "data.path=/d/t.parquet"], schema=schema)
    assert injected_noise(cfg.noise, "parquet").kind == "none"
    assert "no noise injected (your own table, as it is" in summary_lines(cfg, "/out")[1]
    # ...while the same config on its built-in source keeps its benchmark noise.
    builtin = load_config(config_file, [], schema=schema)
    assert injected_noise(builtin.noise, builtin.data.source) == builtin.noise


def _stage(tmp_path, overrides):
    from raypipe.stages import data as data_stage

    cfg = load_config(None, overrides)
    out = str(tmp_path / "data")
    summary = data_stage.run(cfg.data, cfg.noise, out, log=lambda *_: None)
    return summary, data_stage.read_split(out, "train")


def test_a_parquet_run_injects_nothing_unless_asked(tmp_path):
    path, label = _table(tmp_path / "own.parquet", 200, 0)
    own = ["data.source=parquet", f"data.path={path}"]
    summary, train = _stage(tmp_path / "default", own)
    assert summary["n_corrupted"] == 0 and summary["noise_injected"] == "no noise injected"
    np.testing.assert_array_equal(train.label, label[train.sample_id])  # the table's labels, as given
    assert summary["ground_truth"] is None

    summary, train = _stage(tmp_path / "asked", [*own, "noise.apply_to=any", "noise.rate=0.2"])
    assert summary["n_corrupted"] == round(0.2 * len(train)) > 0
    assert summary["noise_injected"] == "symmetric noise 0.2 injected"
    np.testing.assert_array_equal(train.label != label[train.sample_id], train.is_corrupted)


def test_digits_with_the_defaults_keeps_its_forty_percent(tmp_path):
    summary, train = _stage(tmp_path, [])
    assert summary["n_corrupted"] == round(0.4 * len(train)) and train.is_corrupted.mean() == pytest.approx(0.4, 1e-3)
    assert summary["noise_injected"] == "symmetric noise 0.4 injected"
    assert "digits, symmetric noise 0.4 injected" in summary_lines(load_config(None, []), "/out")[1]


def test_apply_to_takes_builtin_or_any_only():
    with pytest.raises(ConfigError, match="noise.apply_to") as refused:
        load_config(None, ["noise.apply_to=parquet"])
    assert "\n" not in str(refused.value)
