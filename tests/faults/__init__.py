"""Fault hooks for the reliability tests, installed in every Ray worker process of a test cluster
(``worker_process_setup_hook`` in tests/conftest.py). Each wraps one raypipe function in the worker
and does nothing unless the test wrote its order file into $RAYPIPE_TEST_FAULTS:

- ``kill.json`` {"route": R, "epoch": E, "log": DIR}: the last-rank Ray Train worker of route R exits
  abruptly (os._exit) after the first batch of epoch E (1-based), once: it leaves DIR/killed-R first,
  so the restarted worker group trains through. Every worker of that route appends
  "start <rank> <first epoch> <unix time>" and "epoch <rank> <epoch> <unix time>" lines to DIR/R.log.
- ``crash.json`` {"crashes": {"<rule>:<lr>": N}, "dir": DIR}: the Tune trials of that rule and learning
  rate raise at their start the first N times (counted by marker files in DIR).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path


def _order(name: str) -> dict | None:
    path = Path(os.environ.get("RAYPIPE_TEST_FAULTS", "/nonexistent")) / name
    return json.loads(path.read_text()) if path.exists() else None


def install() -> None:
    _wrap_worker_batches()
    _wrap_trials()


def _wrap_worker_batches() -> None:
    from raypipe.distributed import train

    batches = train.WorkerShard.batches
    started: set[int] = set()

    def wrapped(self, epoch: int):
        order = _order("kill.json")
        if order is None:
            return batches(self, epoch)
        import ray.train

        context = ray.train.get_context()
        route = context.get_experiment_name().rsplit("-", 1)[0]  # raypipe names each Ray Train run <route>-<ms>
        if route != order["route"]:
            return batches(self, epoch)
        rank, world = context.get_world_rank(), context.get_world_size()
        log = Path(order["log"])
        with open(log / f"{route}.log", "a") as f:
            if id(self) not in started:
                started.add(id(self))
                f.write(f"start {rank} {epoch + 1} {time.time():.3f}\n")
            f.write(f"epoch {rank} {epoch + 1} {time.time():.3f}\n")
        marker = log / f"killed-{route}"
        if epoch + 1 != order["epoch"] or rank != world - 1 or marker.exists():
            return batches(self, epoch)
        return _die_after_first(batches(self, epoch), marker, rank, epoch + 1)

    train.WorkerShard.batches = wrapped


def _die_after_first(batches, marker: Path, rank: int, epoch: int):
    for batch in batches:
        yield batch
        break
    marker.write_text(f"rank {rank} killed in epoch {epoch}\n")
    os._exit(1)


def _wrap_trials() -> None:
    from raypipe.sweep import trial

    run_trial = trial.run_trial

    def wrapped(config, sweep_uri, trial_id, spec, *args, **kwargs):
        order = _order("crash.json")
        times = None if order is None else order["crashes"].get(f"{spec.rule}:{spec.lr:g}")
        if times is not None:
            key = f"{spec.rule}-{spec.lr:g}"
            done = len(list(Path(order["dir"]).glob(f"crash-{key}-*")))
            if done < times:
                (Path(order["dir"]) / f"crash-{key}-{done}").touch()
                raise RuntimeError(f"injected crash {done + 1} of {times}")
        return run_trial(config, sweep_uri, trial_id, spec, *args, **kwargs)

    trial.run_trial = wrapped
