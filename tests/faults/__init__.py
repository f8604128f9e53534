"""Fault hooks for the reliability tests, installed in every Ray worker process of a test cluster
(``worker_process_setup_hook`` in tests/conftest.py). Each wraps one raypipe function in the worker
and does nothing unless the test wrote its order file into $RAYPIPE_TEST_FAULTS:

- ``kill.json`` {"route": R, "epoch": E, "log": DIR}: the last-rank Ray worker of route R (its Ray task,
  or a Ray Train worker) exits abruptly (os._exit) after the first batch of epoch E (1-based), once: it
  leaves DIR/killed-R first, so the task run again / the restarted worker group trains through. Every
  worker of that route appends "start <rank> <first epoch> <unix time>" and "epoch <rank> <epoch> <unix
  time>" lines to DIR/R.log.
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
    _wrap_worker_data()
    _wrap_trials()


def _wrap_worker_data() -> None:
    """Wraps what every Ray worker of a training route trains on (a Ray task or a Ray Train worker)."""
    from raypipe.distributed import train

    make = train.worker_data

    def wrapped(request, rank: int, world: int):
        data, n_train = make(request, rank, world)
        order = _order("kill.json")
        if order is None or request.route != order["route"]:
            return data, n_train
        log, batches, started = Path(order["log"]), data.batches, []

        def logged(epoch: int):
            with open(log / f"{request.route}.log", "a") as f:
                if not started:
                    started.append(epoch)
                    f.write(f"start {rank} {epoch + 1} {time.time():.3f}\n")
                f.write(f"epoch {rank} {epoch + 1} {time.time():.3f}\n")
            marker = log / f"killed-{request.route}"
            if epoch + 1 != order["epoch"] or rank != world - 1 or marker.exists():
                return batches(epoch)
            return _die_after_first(batches(epoch), marker, rank, epoch + 1)

        data.batches = logged
        return data, n_train

    train.worker_data = wrapped


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
