"""The stage runner's order: a stage starts once the stages it reads are done; independent training
routes go to an executor with `concurrent_stages` together, any other executor gets one stage at a
time in table order; and the report's account of routes that overlapped. Stub stage bodies, no Ray."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from raypipe import pipeline, storage
from raypipe.config import load_config
from raypipe.layout import RunLayout
from raypipe.pipeline import Run, Stage
from raypipe.report.report import overlapping_routes, render_markdown

ROUTES = ("l_ft", "f_ft", "retrain")


class StubExecutor:
    """Records when each stage body ran; the routes wait at a barrier when it says it runs them together."""

    name = "stub"

    def __init__(self, concurrent: bool):
        self.concurrent_stages = concurrent
        self.spans: dict[str, tuple[float, float]] = {}
        self.barrier = threading.Barrier(len(ROUTES), timeout=30)

    def body(self, run: Run, name: str) -> dict[str, Any]:
        start = time.perf_counter()
        if name in ROUTES and self.concurrent_stages:
            self.barrier.wait()  # passes only when all three routes run at the same time
        time.sleep(0.05)
        self.spans[name] = (start, time.perf_counter())
        return {"stage": name}


@pytest.fixture
def stub_table(monkeypatch):
    """The pipeline's own table (names, inputs) with stub bodies and no settings (and no data to check the
    settings against)."""

    def stub(stage: Stage) -> Stage:
        return Stage(stage.name, stage.inputs, lambda cfg: {}, lambda r, uri: r.executor.body(r, stage.name))

    monkeypatch.setattr(pipeline, "STAGES", tuple(stub(s) for s in pipeline.STAGES))
    monkeypatch.setattr(pipeline, "check_against_data", lambda config, data_summary: None)


def _run(tmp_path, executor: StubExecutor) -> Run:
    return Run(load_config(None, []), RunLayout(str(tmp_path / "run")), executor, log=lambda *_: None).run()


def _after_inputs(spans: dict[str, tuple[float, float]]) -> None:
    for stage in pipeline.STAGES:
        for name in stage.inputs:
            assert spans[name][1] <= spans[stage.name][0], f"{stage.name} started before its input {name} ended"


def test_independent_routes_run_together_on_a_concurrent_executor(stub_table, tmp_path):
    executor = StubExecutor(concurrent=True)
    run = _run(tmp_path, executor)
    assert set(run.ran) == set(pipeline.STAGE_NAMES)
    _after_inputs(executor.spans)  # and the barrier proved the three routes overlapped
    for name in pipeline.STAGE_NAMES:  # each stage's own record, as when run alone
        assert storage.read_manifest(run.layout.stage(name))["stage"] == name


def test_other_executors_get_one_stage_at_a_time_in_table_order(stub_table, tmp_path):
    executor = StubExecutor(concurrent=False)
    run = _run(tmp_path, executor)
    assert run.ran == list(pipeline.STAGE_NAMES)
    ordered = sorted(executor.spans.items(), key=lambda item: item[1][0])
    assert [name for name, _ in ordered] == list(pipeline.STAGE_NAMES)
    assert all(a[1][1] <= b[1][0] for a, b in zip(ordered, ordered[1:], strict=False))  # never two at once


def test_a_failed_route_fails_the_run_after_the_others_finished(stub_table, tmp_path):
    class Failing(StubExecutor):
        def body(self, run, name):
            if name == "f_ft":
                self.barrier.wait()
                raise RuntimeError("f_ft failed")
            return super().body(run, name)

    executor = Failing(concurrent=True)
    with pytest.raises(RuntimeError, match="f_ft failed"):
        _run(tmp_path, executor)
    lay = RunLayout(str(tmp_path / "run"))
    assert storage.read_manifest(lay.stage("f_ft")) is None  # unfinished: a rerun starts it again
    for name in ("l_ft", "retrain"):
        assert storage.read_manifest(lay.stage(name))["stage"] == name


def test_report_lists_the_routes_that_overlapped():
    def stage(start: float, end: float) -> dict[str, Any]:
        return {"summary": {"wall_interval": [start, end]}, "seconds": end - start}

    manifests = {"initial": stage(0, 10), "l_ft": stage(20, 22), "f_ft": stage(20, 30), "retrain": stage(21, 40)}
    assert overlapping_routes(manifests) == {
        "l_ft": ["f_ft", "retrain"],
        "f_ft": ["l_ft", "retrain"],
        "retrain": ["l_ft", "f_ft"],
    }
    assert overlapping_routes({"initial": stage(0, 10), "f_ft": stage(10, 12)}) == {}  # one after the other
    assert overlapping_routes({"initial": {"summary": {}, "seconds": 1.0}}) == {}  # a given model: no interval
    report = {
        "routes": {r: {"accuracy": 0.5} for r in ("initial", "l_ft", "f_ft", "retrain")},
        "routes_overlapped": overlapping_routes(manifests),
        "data": {"rows": {"train": 10, "test": 5}, "n_corrupted": 4},
        "config": {"data": {"source": "digits"}, "noise": {"kind": "symmetric", "rate": 0.4}, "model": {"name": "mlp"}},
        "pruning": {"probe_width": 8, "n_pruned": 1},
        "attribution": {"rule": "loss"},
        "partition": {"n_clean": 6, "n_noisy": 4, "tau": 0.5},
        "detection": {},
        "stages_seconds": {},
    }
    assert "L-FT, F-FT, Retrain ran side by side" in render_markdown(report)
    assert "side by side" not in render_markdown({**report, "routes_overlapped": {}})
