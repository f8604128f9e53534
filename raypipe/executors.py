"""Where stage work runs. `LocalExecutor` runs it in this process; the Ray executor
(raypipe.distributed) runs the same functions on Ray Data actor pools, Ray tasks and Ray Train.

The contract (what a stage may ask of an executor):
- map(fn, items, desc) -> [fn(item) for item in items], in order; fn is pure and idempotent;
- attribute(model_uri, jobs, rule, batch_size, device) -> rows written, for (in_uri, out_uri) jobs;
- train(request) -> metrics dict of a raypipe.stages.train.TrainRequest.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any


class LocalExecutor:
    name = "local"

    def __init__(self, log: Callable[[str], None] = print):
        self.log = log

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

    def attribute(self, model_uri: str, jobs: list[tuple[str, str]], rule: str, batch_size: int, device: str) -> int:
        from raypipe.stages.attribution import ShardAttributor

        if not jobs:
            return 0
        attributor = ShardAttributor(model_uri, rule, batch_size, device)
        return sum(self.map(lambda job: attributor(*job), jobs, "attribution"))

    def train(self, request) -> dict[str, Any]:
        from raypipe.stages.train import train_local

        return train_local(request, self.log)

    def close(self) -> None:
        pass
