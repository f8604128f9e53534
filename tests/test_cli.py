"""The CLI turns every user error into one `error:` line and exit status 2, leaving no finished stage."""

from __future__ import annotations

from pathlib import Path

import pytest

from raypipe.cli import main


def _no_results(out: Path) -> None:
    assert not (out / "report.json").exists()
    if out.exists():
        assert list(out.rglob("_manifest.json")) == []
        assert list(out.rglob("report.json")) == []


def _fails_with_one_error_line(capsys, argv: list[str], *needles: str) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0]
    return lines[0]


@pytest.mark.parametrize(
    "overrides,needles",
    [
        (["noise.rat=0.1"], ["'noise.rat'"]),
        (["noise.rate=1.5"], ["'noise.rate'"]),
        (["model.name=nope"], ["'model.name'", "nope"]),
        (["initial.epochs=abc"], ["'initial.epochs'"]),
    ],
)
def test_config_errors(tmp_path, capsys, overrides, needles):
    out = tmp_path / "run"
    _fails_with_one_error_line(capsys, ["run", "--out", str(out), *overrides], *needles)
    _no_results(out)


def test_missing_config_file(tmp_path, capsys):
    out = tmp_path / "run"
    missing = tmp_path / "nowhere.yaml"
    _fails_with_one_error_line(capsys, ["run", "--out", str(out), "--config", str(missing)], str(missing))
    _no_results(out)


def test_invalid_config_file(tmp_path, capsys):
    out = tmp_path / "run"
    bad = tmp_path / "bad.yaml"
    bad.write_text("noise: [1, 2\n")
    _fails_with_one_error_line(capsys, ["run", "--out", str(out), "--config", str(bad)], "not valid YAML")
    _no_results(out)


def test_missing_parquet_data(tmp_path, capsys):
    out = tmp_path / "run"
    missing = tmp_path / "no_such_table.parquet"
    argv = ["run", "--out", str(out), "data.source=parquet", f"data.path={missing}", "run.device=cpu"]
    _fails_with_one_error_line(capsys, argv, "data.path", str(missing))
    _no_results(out)


def test_parquet_without_path(tmp_path, capsys):
    out = tmp_path / "run"
    _fails_with_one_error_line(capsys, ["run", "--out", str(out), "data.source=parquet"], "data.path")
    _no_results(out)


def test_unknown_from_stage(tmp_path, capsys):
    out = tmp_path / "run"
    _fails_with_one_error_line(capsys, ["run", "--out", str(out), "--from", "nope", "data.source=digits"], "--from")
    _no_results(out)


def test_relative_out_is_refused_only_inside_a_submitted_job_with_a_working_dir(tmp_path):
    import json

    from raypipe.cli import JOB_CONFIG_ENV, relative_out_in_job

    job = {JOB_CONFIG_ENV: json.dumps({"runtime_env": {"working_dir": "."}})}
    assert "'runs/x' is a relative path" in relative_out_in_job("runs/x", job)
    assert relative_out_in_job(str(tmp_path / "x"), job) is None  # absolute
    assert relative_out_in_job("s3://bucket/runs/x", job) is None
    assert relative_out_in_job("runs/x", {}) is None  # not a submitted job: relative to the user's cwd
    assert relative_out_in_job("runs/x", {JOB_CONFIG_ENV: json.dumps({"runtime_env": {}})}) is None
    assert relative_out_in_job("runs/x", {JOB_CONFIG_ENV: "not json"}) is None


@pytest.mark.parametrize("command", ["run", "sweep"])
def test_main_refuses_a_relative_out_in_a_submitted_job(monkeypatch, tmp_path, capsys, command):
    import json

    from raypipe.cli import JOB_CONFIG_ENV

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(JOB_CONFIG_ENV, json.dumps({"runtime_env": {"working_dir": str(tmp_path)}}))
    assert main([command, "--out", "runs/rel"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out 'runs/rel' is a relative path") and err.count("\n") == 1
    assert not (tmp_path / "runs").exists()


def test_version(capsys):
    import raypipe

    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"raypipe {raypipe.__version__}"


def test_config_prints_the_resolved_config_and_runs_nothing(tmp_path, capsys, monkeypatch):
    import yaml

    monkeypatch.chdir(tmp_path)
    assert main(["config", "noise.rate=0.25", "model.name=cnn_small"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["noise"]["rate"] == 0.25 and printed["model"]["name"] == "cnn_small"
    assert printed["initial"]["epochs"] == 60  # a default, resolved
    assert "sweep" not in printed
    assert list(tmp_path.iterdir()) == []  # nothing written
    assert main(["config", "--sweep", "sweep.num_samples=3"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["sweep"]["num_samples"] == 3


def test_config_refuses_a_bad_key_like_run(capsys):
    _fails_with_one_error_line(capsys, ["config", "noise.rat=0.1"], "'noise.rat'")


def test_bad_from_is_refused_before_anything_is_printed_or_written(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["run", "--out", str(out), "--from", "bogus"])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert "'bogus' is not a stage" in captured.err
    assert not out.exists()
