"""Where stage work runs (`raypipe.stages.Executor`): `LocalExecutor` runs it in this process; the Ray
executor (`raypipe.distributed.ray_executor`) runs the same functions on Ray Data actor pools, Ray
tasks and Ray Train. `raypipe.api.make_executor` picks one from ``run.executor``."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from raypipe.stages.attribution import ShardAttributor
from raypipe.stages.train import TrainRequest, train_local


class LocalExecutor:
    """Every stage in this process. `report`, when given, receives each training epoch's metrics
    (a Tune trial hands its own `tune.report` here)."""

    name = "local"

    def __init__(self, log: Callable[[str], None] = print, report: Callable[[dict[str, Any]], None] | None = None):
        self.log = log
        self.report = report

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any], desc: str = "") -> list[Any]:
        items = list(items)
        out, start, last = [], time.perf_counter(), 0.0
        for i, item in enumerate(items):
            out.append(fn(item))
            now = time.perf_counter() - start
            if len(items) > 1 and (now - last > 5 or i + 1 == len(items)):
                self.log(f"  {desc}: {i + 1}/{len(items)} shards ({now:.1f} s)")
                last = now
        return out

    def attribute(
        self,
        model_uri: str,
        jobs: list[tuple[str, str]],
        rule: str,
        batch_size: int,
        device: str,
        probe_models: dict[str, str] | None = None,
    ) -> int:
        if not jobs:
            return 0
        attributor = ShardAttributor(model_uri, rule, batch_size, device, probe_models)
        return sum(self.map(lambda job: attributor(*job), jobs, "attribution"))

    def train(self, request: TrainRequest) -> dict[str, Any]:
        return train_local(request, self.log, self.report)

    def close(self) -> None:
        pass
