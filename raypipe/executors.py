"""Where stage work runs (`raypipe.stages.Executor`): `LocalExecutor` runs it in this process; the Ray
executor (`raypipe.distributed.ray_executor`) runs the same functions in Ray tasks (and actors on
GPUs) and on Ray Train. `raypipe.api.make_executor` picks one from ``run.executor``."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

from raypipe.stages.attribution import AttributionPass
from raypipe.stages.train import TrainRequest, train_local


def progress_bar(total: int, desc: str):
    """A tqdm bar on stderr for `total` (> 1) items when stderr is a terminal, else None."""
    if total <= 1 or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=f"  {desc}", unit="shard", leave=False, file=sys.stderr)


class LocalExecutor:
    """Every stage in this process. `report`, when given, receives each training epoch's metrics
    (a Tune trial hands its own `tune.report` here)."""

    name = "local"
    concurrent_stages = False  # one stage at a time, in table order

    def __init__(self, log: Callable[[str], None] = print, report: Callable[[dict[str, Any]], None] | None = None):
        self.log = log
        self.report = report

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any], desc: str = "") -> list[Any]:
        """fn over items, in order. Several items: a progress bar on a terminal, else a line about every 5 s
        (a log file gets no bar redraws); one line when done."""
        items = list(items)
        out, start, last = [], time.perf_counter(), 0.0
        bar = progress_bar(len(items), desc)
        for i, item in enumerate(items):
            out.append(fn(item))
            now = time.perf_counter() - start
            if bar is not None:
                bar.update(1)
            if len(items) > 1 and ((bar is None and now - last > 5) or i + 1 == len(items)):
                self.log(f"  {desc}: {i + 1}/{len(items)} shards ({now:.1f} s)")
                last = now
        if bar is not None:
            bar.close()
        return out

    def attribute(self, spec: AttributionPass, jobs: list[tuple[str, str]]) -> int:
        if not jobs:
            return 0
        attributor = spec.attributor()
        return sum(self.map(lambda job: attributor(*job), jobs, "attribution"))

    def train(self, request: TrainRequest) -> dict[str, Any]:
        return train_local(request, self.log, self.report)

    def close(self) -> None:
        pass
