"""Reliability: atomic outputs, a driver killed inside or between stages, a Train worker killed mid-epoch.

- Atomic outputs (unit level, no Ray): a failed write leaves no partial file, a stage's manifest is written
  after all of its outputs, a stage that raised is not finished, and a rerun with other settings clears it.
- Driver killed (`raypipe run` as a subprocess, SIGKILL at a chosen point, local executor): the rerun skips
  the finished stages, keeps the finished attribution shards (same inode and mtime: not recomputed), and
  ends with the same report as an uninterrupted run (seeded, one thread: the very same numbers).
- Train worker killed (on this module's local Ray, through the fault hook tests/faults installs in its
  workers): a one-worker route's Ray task is run again from the latest checkpoint and ends with the very
  numbers of an uninterrupted in-process run; a Ray Train group restarts from the latest checkpoint,
  redoes at most the epoch in flight, finishes, and reports metrics close to a clean run of the same
  route; killed after the trajectory epochs of the initial model, the partition still uses the
  trajectory signals.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from raypipe import layout, storage
from raypipe.config import load_config
from raypipe.errors import RaypipeError, StorageError
from raypipe.executors import LocalExecutor
from raypipe.layout import PENDING, RunLayout
from raypipe.pipeline import Run, Stage

REPO = Path(__file__).resolve().parents[1]
QUIET = {"log": lambda *_: None}
# 400 training samples in 4 shards; 6 epochs for the model to repair, then F-FT for 3.
F_FT_EPOCHS = 3
RUN = [
    "data.max_train_samples=400",
    "data.shard_rows=100",
    "initial.epochs=6",
    "run.routes=[f_ft]",
    f"f_ft.epochs={F_FT_EPOCHS}",
    "attribution.batch_size=8",
    "run.device=cpu",
]
N_SHARDS = 4
ONE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


# ---------------------------------------------------------------------------------------------
# 5. Atomic outputs.


def test_failed_write_leaves_neither_partial_nor_temporary_file(tmp_path, monkeypatch):
    target = tmp_path / "stage" / "part-00000.parquet"
    storage.write_bytes(str(target), b"old, complete")

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(storage.os, "fsync", disk_full)  # fails after the bytes went to the temporary file
    with pytest.raises(StorageError, match=r"cannot write '.*part-00000.parquet': no space left on the device"):
        storage.write_bytes(str(target), b"new" * 1000)
    with pytest.raises(StorageError, match="No space left"):
        storage.write_bytes(str(tmp_path / "stage" / "part-00001.parquet"), b"new")
    assert target.read_bytes() == b"old, complete"  # the reader still sees the whole old file
    assert sorted(p.name for p in target.parent.iterdir()) == ["part-00000.parquet"]


def test_list_files_ignores_temporaries(tmp_path):
    (tmp_path / ".tmp-0123abcd").write_bytes(b"half a shard")
    (tmp_path / ".tmp-4567.parquet").write_bytes(b"half a shard")
    storage.write_bytes(str(tmp_path / "part-00000.parquet"), b"a shard")
    assert storage.list_files(str(tmp_path), ".parquet") == [str(tmp_path / "part-00000.parquet")]


def _run_stage(out: Path, name: str, settings: dict[str, Any], body) -> dict[str, Any]:
    """One stage with an ad hoc body through the pipeline's runner."""
    stage = Stage(name, (), lambda cfg: settings, lambda run, uri: body(uri))
    return Run(load_config(None, []), RunLayout(str(out)), LocalExecutor(**QUIET), **QUIET).run_stage(stage)


class Boom(RuntimeError):
    pass


def _stage_files(out: Path, stage: str) -> list[str]:
    return sorted(p.name for p in (out / stage).iterdir()) if (out / stage).exists() else []


def test_manifest_is_written_last_and_never_seen_early(tmp_path, monkeypatch):
    out = tmp_path / "run"
    written: list[str] = []
    real_write = storage.write_bytes
    monkeypatch.setattr(storage, "write_bytes", lambda uri, data: (written.append(uri), real_write(uri, data)))

    def body(uri: str) -> dict[str, Any]:
        for k in range(3):
            # A reader at any point of the body finds the stage unfinished.
            assert storage.read_manifest(uri) is None
            storage.write_bytes(storage.join(uri, f"part-{k:05d}.parquet"), b"rows")
        return {"rows": 3}

    _run_stage(out, "attribution", {"rule": "loss"}, body)
    in_stage = [u.rsplit("/", 1)[-1] for u in written if "/attribution/" in u]
    assert in_stage[0] == PENDING and in_stage[-1] == storage.MANIFEST  # started first, finished last
    assert in_stage[1:-1] == [f"part-{k:05d}.parquet" for k in range(3)]
    assert _stage_files(out, "attribution") == [storage.MANIFEST, *[f"part-{k:05d}.parquet" for k in range(3)]]


def test_failed_stage_is_not_finished_then_resumes_or_is_cleared(tmp_path):
    out = tmp_path / "run"

    def dies_after(n: int):
        def body(uri: str) -> dict[str, Any]:
            for k in range(n):
                storage.write_bytes(storage.join(uri, f"part-{k:05d}.parquet"), b"rows")
            raise Boom("killed half way")

        return body

    with pytest.raises(Boom):
        _run_stage(out, "attribution", {"rule": "loss"}, dies_after(2))
    assert storage.read_manifest(str(out / "attribution")) is None
    assert _stage_files(out, "attribution") == [PENDING, "part-00000.parquet", "part-00001.parquet"]

    # The same settings: the finished shards are kept (resume), the stage still unfinished after another death.
    seen: list[list[str]] = []

    def sees_then_dies(uri: str) -> dict[str, Any]:
        seen.append(_stage_files(out, "attribution"))
        raise Boom("again")

    with pytest.raises(Boom):
        _run_stage(out, "attribution", {"rule": "loss"}, sees_then_dies)
    assert seen[-1] == [PENDING, "part-00000.parquet", "part-00001.parquet"]

    # Other settings: the half-done stage of the old settings is cleared before the body runs.
    with pytest.raises(Boom):
        _run_stage(out, "attribution", {"rule": "grad_x_act_label"}, sees_then_dies)
    assert seen[-1] == [PENDING]
    assert storage.read_json(str(out / "attribution" / PENDING))["fingerprint"] == storage.fingerprint(
        {"settings": {"rule": "grad_x_act_label"}, "inputs": {}}
    )


def test_finished_stage_rerun_with_other_settings_is_unfinished_until_done(tmp_path):
    out = tmp_path / "run"
    _run_stage(out, "partition", {"tau": 0.5}, lambda uri: storage.write_bytes(uri + "/a", b"x") or {})
    assert storage.read_manifest(str(out / "partition"))["settings"] == {"tau": 0.5}

    def dies(uri: str) -> dict[str, Any]:
        assert storage.read_manifest(uri) is None  # the old manifest went before any new output
        storage.write_bytes(storage.join(uri, "a"), b"half of tau=0.3")
        raise Boom("killed")

    with pytest.raises(Boom):
        _run_stage(out, "partition", {"tau": 0.3}, dies)
    assert storage.read_manifest(str(out / "partition")) is None
    # The unchanged settings do not revive the old result: the stage now holds another setting's half output.
    ran = []
    _run_stage(out, "partition", {"tau": 0.5}, lambda uri: ran.append(uri) or {})
    assert ran and _stage_files(out, "partition") == [storage.MANIFEST]


def test_a_shared_stage_is_never_recomputed_in_its_folder(tmp_path):
    """A sweep trial reads the sweep's shared stages; settings that do not match them stop the run
    instead of clearing and recomputing a folder other runs read."""
    owner = tmp_path / "base"
    _run_stage(owner, "partition", {"tau": 0.5}, lambda uri: storage.write_bytes(uri + "/a", b"shared") or {})
    stage = Stage("partition", (), lambda cfg: {"tau": 0.3}, lambda run, uri: {})
    trial = RunLayout(str(tmp_path / "trial"), {"partition": str(owner / "partition")})
    with pytest.raises(RaypipeError, match="shared folder"):
        Run(load_config(None, []), trial, LocalExecutor(**QUIET), **QUIET).run_stage(stage)
    assert (owner / "partition" / "a").read_bytes() == b"shared"
    assert storage.read_manifest(str(owner / "partition"))["settings"] == {"tau": 0.5}


# ---------------------------------------------------------------------------------------------
# 3. The driver killed inside or between stages, local executor.

# Runs the real CLI in a subprocess, with one function wrapped so that the process stops at a chosen
# point: it writes STOP_MARKER and sleeps until the test kills it.
STOPPER = """
import os, sys, time

def stop_here(what):
    with open(os.environ["STOP_MARKER"], "w") as f:
        f.write(what)
    time.sleep(600)

where = os.environ["STOP_WHERE"]
if where == "attribution":  # inside the stage: after STOP_AFTER shards are published
    from raypipe.stages import attribution as attribute

    call, done = attribute.ShardAttributor.__call__, []

    def counted(self, in_uri, out_uri):
        rows = call(self, in_uri, out_uri)
        done.append(out_uri)
        if len(done) == int(os.environ["STOP_AFTER"]):
            stop_here(out_uri)
        return rows

    attribute.ShardAttributor.__call__ = counted
else:  # between stages: `prune` finished, `f_ft` about to train
    from raypipe import executors

    train_local = executors.train_local

    def stop_at_f_ft(request, *args, **kwargs):
        if request.route == "f_ft":
            stop_here("f_ft")
        return train_local(request, *args, **kwargs)

    executors.train_local = stop_at_f_ft

from raypipe.cli import main

sys.exit(main(sys.argv[1:]))
"""


def _comparable(report: dict[str, Any]) -> dict[str, Any]:
    """The report without wall times (and their Unix intervals) and file locations."""

    def strip(obj: Any) -> Any:
        if isinstance(obj, dict):
            timing = ("stages_seconds", "wall_interval")
            return {k: strip(v) for k, v in obj.items() if not k.startswith("seconds") and k not in timing}
        if isinstance(obj, list):
            return [strip(v) for v in obj]
        return obj

    return strip({k: v for k, v in report.items() if k != "plots"})


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """The uninterrupted run, in this process, on one thread (the killed runs use one thread too)."""
    import torch
    from threadpoolctl import threadpool_limits

    import raypipe

    out = tmp_path_factory.mktemp("reference") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            report = raypipe.run(load_config(None, RUN), str(out), **QUIET)
    finally:
        torch.set_num_threads(threads)
    assert len(list((out / "attribution" / "samples").glob("part-*.parquet"))) == N_SHARDS
    return out, report


def _run_until_stopped(out: Path, where: str, stop_after: int = 0) -> None:
    marker = out.parent / f"stopped-{where}"
    env = {**os.environ, **ONE_THREAD, "STOP_WHERE": where, "STOP_AFTER": str(stop_after), "STOP_MARKER": str(marker)}
    argv = [sys.executable, "-c", STOPPER, "run", "--out", str(out), *RUN]
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            if proc.poll() is not None:
                pytest.fail(f"the run ended before it was killed (status {proc.returncode}): {proc.stderr.read()}")
            assert time.monotonic() < deadline, "the run never reached the point to kill it at"
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)  # the driver dies at once: no cleanup, no atexit, no finally
        proc.wait(timeout=60)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


def _rerun(out: Path) -> tuple[dict[str, Any], list[str]]:
    import torch
    from threadpoolctl import threadpool_limits

    import raypipe

    logs: list[str] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            report = raypipe.run(load_config(None, RUN), str(out), log=logs.append)
    finally:
        torch.set_num_threads(threads)
    return report, logs


def _stages_in_logs(logs: list[str], what: str) -> list[str]:
    return [line.split("]")[0].lstrip("[") for line in logs if what in line]


@pytest.mark.slow
def test_driver_killed_inside_attribution_resumes_its_shards(reference_run, tmp_path):
    ref_out, ref_report = reference_run
    out = tmp_path / "run"
    _run_until_stopped(out, "attribution", stop_after=2)

    # What the killed run left: data and initial finished, attribution unfinished with 2 whole shards.
    for stage in ("data", "initial"):
        assert storage.read_manifest(str(out / stage)) is not None, stage
    assert storage.read_manifest(str(out / "attribution")) is None
    assert (out / "attribution" / PENDING).exists()
    shards = sorted((out / "attribution" / "samples").glob("part-*.parquet"))
    assert len(shards) == 2 and not list((out / "attribution" / "samples").glob(".tmp-*"))
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in shards}
    assert not (out / "partition").exists() and not (out / "report.json").exists()

    report, logs = _rerun(out)
    assert _stages_in_logs(logs, "up to date, skipped") == ["data", "initial"]
    assert _stages_in_logs(logs, "] done in") == ["attribution", "partition", "prune", "f_ft"]
    assert any(f"{N_SHARDS - 2} of {N_SHARDS} shards to compute" in line for line in logs), logs
    after = {
        p.name: (p.stat().st_ino, p.stat().st_mtime_ns)
        for p in (out / "attribution" / "samples").glob("part-*.parquet")
    }
    assert len(after) == N_SHARDS
    assert {name: after[name] for name in before} == before  # the finished shards were not recomputed
    assert storage.read_manifest(str(out / "attribution"))["summary"]["rows_computed"] == 400 - 2 * 100

    assert _comparable(report) == _comparable(ref_report)
    assert _comparable(json.loads((out / "report.json").read_text())) == _comparable(
        json.loads((ref_out / "report.json").read_text())
    )


@pytest.mark.slow
def test_driver_killed_between_stages_reruns_only_the_rest(reference_run, tmp_path):
    _, ref_report = reference_run
    out = tmp_path / "run"
    _run_until_stopped(out, "f_ft")
    finished = ("data", "initial", "attribution", "partition", "prune")
    for stage in finished:
        assert storage.read_manifest(str(out / stage)) is not None, stage
    assert storage.read_manifest(str(out / "f_ft")) is None and (out / "f_ft" / PENDING).exists()
    stamps = {s: storage.read_manifest(str(out / s))["finished_at"] for s in finished}

    report, logs = _rerun(out)
    assert _stages_in_logs(logs, "up to date, skipped") == list(finished)
    assert _stages_in_logs(logs, "] done in") == ["f_ft"]
    assert {s: storage.read_manifest(str(out / s))["finished_at"] for s in finished} == stamps
    assert _comparable(report) == _comparable(ref_report)


# ---------------------------------------------------------------------------------------------
# 2. A Ray Train worker killed mid-epoch.


def _route_log(hook_dir: Path, route: str) -> list[tuple[str, int, int]]:
    """(kind, rank, epoch) of the hook's lines "start|epoch <rank> <epoch> <unix time>", in time order."""
    lines = [line.split() for line in (hook_dir / f"{route}.log").read_text().splitlines()]
    return [(kind, int(rank), int(epoch)) for kind, rank, epoch, _ in sorted(lines, key=lambda f: float(f[3]))]


def _arm_kill(faults: Path, hook_dir: Path, route: str, epoch: int) -> None:
    """The last rank of `route`'s Train workers dies after one batch of `epoch` (tests/faults)."""
    hook_dir.mkdir()
    (faults / "kill.json").write_text(json.dumps({"route": route, "epoch": epoch, "log": str(hook_dir)}))


def _f_ft_killed_in_epoch_2(ref_out: Path, faults: Path, tmp_path: Path, workers: int):
    """F-FT on Ray with `workers` workers from the reference run's finished stages, the last rank killed
    in epoch 2 -> (its run folder, report, log lines, the hook's folder)."""
    import raypipe

    out = tmp_path / "run"
    shutil.copytree(ref_out, out)  # data ... prune finished (the executor is not part of any fingerprint)
    config = load_config(None, [*RUN, "run.executor=ray", f"ray.num_workers={workers}", "ray.max_failures=2"])
    hook_dir = tmp_path / "hook"
    _arm_kill(faults, hook_dir, "f_ft", 2)
    logs: list[str] = []
    try:
        report = raypipe.run(config, str(out), from_stage="f_ft", log=logs.append)
    finally:
        (faults / "kill.json").unlink()
    assert (hook_dir / "killed-f_ft").exists()  # a worker process really died
    return out, report, logs, hook_dir


@pytest.mark.ray
@pytest.mark.slow
def test_route_task_killed_mid_epoch_resumes_from_checkpoint(reference_run, ray_cluster, faults, tmp_path):
    """One worker a route: the route is a Ray task, no TorchTrainer. Its worker process dies in epoch 2;
    Ray runs the task again, which resumes from the checkpoint of epoch 1 and ends as the in-process run did."""
    ref_out, ref_report = reference_run
    out, killed, logs, hook_dir = _f_ft_killed_in_epoch_2(ref_out, faults, tmp_path, workers=1)
    assert any("[f_ft] training: a Ray task" in line for line in logs), logs
    events = _route_log(hook_dir, "f_ft")
    assert [(rank, epoch) for kind, rank, epoch in events if kind == "start"] == [(0, 1), (0, 2)], events
    assert [epoch for kind, _, epoch in events if kind == "epoch"] == [1, 2, 2, 3], events
    assert not (out / "f_ft" / "checkpoint.pt").exists()  # published: the resume point is gone
    summary = storage.read_manifest(str(out / "f_ft"))["summary"]
    assert summary["epochs"] == F_FT_EPOCHS and summary["num_workers"] == 1
    # The same loop, data order and optimizer state as the uninterrupted in-process run: the same numbers.
    clean, after_kill = ref_report["routes"]["f_ft"], killed["routes"]["f_ft"]
    for metric in ("accuracy", "macro_f1", "macro_precision", "n_train"):
        assert after_kill[metric] == pytest.approx(clean[metric], abs=1e-6), metric
    reference = storage.read_manifest(str(ref_out / "f_ft"))["summary"]["history"]
    assert [h["train_loss"] for h in summary["history"]] == pytest.approx([h["train_loss"] for h in reference])


@pytest.mark.ray
@pytest.mark.slow
def test_train_worker_killed_mid_epoch_resumes_from_checkpoint(reference_run, ray_cluster, faults, tmp_path):
    ref_out, ref_report = reference_run
    out, killed, logs, hook_dir = _f_ft_killed_in_epoch_2(ref_out, faults, tmp_path, workers=2)
    events = _route_log(hook_dir, "f_ft")
    starts = [(rank, epoch) for kind, rank, epoch in events if kind == "start"]
    # Two worker groups: the first from epoch 1, the restarted one from the checkpoint of epoch 1.
    assert sorted(starts) == [(0, 1), (0, 2), (1, 1), (1, 2)], events
    rank0_epochs = [epoch for kind, rank, epoch in events if kind == "epoch" and rank == 0]
    assert rank0_epochs == [1, 2, 2, 3], events  # only the epoch in flight was redone
    assert len(rank0_epochs) <= F_FT_EPOCHS + 1

    assert _stages_in_logs(logs, "] done in") == ["f_ft"]
    summary = storage.read_manifest(str(out / "f_ft"))["summary"]
    assert summary["epochs"] == F_FT_EPOCHS and summary["num_workers"] == 2
    # The clean run: the same route on the same inputs in-process (the reference). The 2 workers see the same
    # global batches, but sum their gradients in another order (and pad the last batch), so the numbers are
    # close, not equal.
    clean, after_kill = ref_report["routes"]["f_ft"], killed["routes"]["f_ft"]
    assert after_kill["n_train"] == clean["n_train"]
    for metric in ("accuracy", "macro_f1", "macro_precision"):
        assert after_kill[metric] == pytest.approx(clean[metric], abs=0.05), metric


@pytest.mark.ray
@pytest.mark.slow
def test_train_worker_killed_after_the_trajectory_epochs_keeps_the_trajectory(
    reference_run, ray_cluster, faults, tmp_path
):
    """The trajectory recorder's state is in the resumable checkpoint: a worker group restarted after the
    trajectory epochs of the initial model still writes the whole trajectory, and the partition uses it."""
    import raypipe

    ref_out, _ = reference_run
    out = tmp_path / "run"
    shutil.copytree(ref_out / "data", out / "data")
    config = load_config(
        None, [*RUN, "detection.aum_epochs=3", "run.executor=ray", "ray.num_workers=2", "ray.max_failures=2"]
    )
    hook_dir = tmp_path / "hook"
    _arm_kill(faults, hook_dir, "initial", 5)  # after epochs 1-3 were recorded
    logs: list[str] = []
    try:
        report = raypipe.run(config, str(out), log=logs.append)
    finally:
        (faults / "kill.json").unlink()

    assert (hook_dir / "killed-initial").exists()
    rank0_epochs = [epoch for kind, rank, epoch in _route_log(hook_dir, "initial") if kind == "epoch" and rank == 0]
    assert rank0_epochs == [1, 2, 3, 4, 5, 5, 6], rank0_epochs  # resumed from the checkpoint of epoch 4
    trajectory = storage.read_table(layout.trajectory_file(str(out / "initial"))).to_pydict()
    n_train = storage.read_manifest(str(out / "data"))["summary"]["rows"]["train"]
    assert len(trajectory["sample_id"]) == n_train
    assert all(v == v for v in trajectory["aum"]) and all(v == v for v in trajectory["early_loss"])  # no NaN
    partition = storage.read_manifest(str(out / "partition"))["summary"]
    assert {"aum", "early_loss"} <= set(partition["signals_available"]), partition["signals_available"]
    assert {"aum", "early_loss"} <= set(report["detection"]["auroc_by_signal"])
