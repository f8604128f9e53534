"""Per-shard work on Ray: attribution shards and the stages' per-shard functions, in Ray tasks on warm
worker processes (on GPUs, one actor per GPU).

Ray runs each concurrent task in a worker process and keeps it for the next ones; a fresh process
first spends seconds importing torch, pyarrow and raypipe (3-3.5 CPU seconds measured on a 2-CPU
machine). So on CPUs attribution runs in plain tasks, each worker process loading the model once
(`_attributor`), and the same processes go on to serve the partition's and prune's tasks and the
one-worker training routes, warm. (An actor pool starts processes of its own and, as Ray keeps about
one idle worker per CPU, pushes the warm ones out: the partition's tasks right after it measured
9.2 s against 2.0 s on warm workers, 12k samples on 2 CPUs.) `warm_up` starts and imports those
processes while the driver prepares the data, and the executor waits for them before its first task
(a cold task would spend that time importing anyway). Ray runs each GPU task in a fresh process
(`max_calls=1` for GPU tasks), so with GPUs every GPU gets one actor for the whole pass instead.

Failures: a task whose worker or node died is run again (Ray retries system failures); an actor whose
node died is restarted elsewhere and its call retried (`max_restarts` / `max_task_retries` -1). A
shard is published only whole, so a rerun computes only the shards still missing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import ray
import torch

from raypipe import storage
from raypipe.stages.attribution import AttributionPass, ShardAttributor

_loaded: dict[tuple[Any, ...], ShardAttributor] = {}  # this worker process's model, kept between tasks


def _attributor(spec: AttributionPass) -> ShardAttributor:
    """The attributor of `spec`, loaded once per worker process (again when the model file changed)."""
    fs, path = storage.resolve(spec.model_uri)
    info = fs.get_file_info(path)
    key = (spec, info.mtime_ns, info.size)
    if key not in _loaded:
        _loaded.clear()  # one model per process
        _loaded[key] = spec.attributor()
    return _loaded[key]


def attribute_shard(spec: AttributionPass, threads: int, in_uri: str, out_uri: str) -> int:
    """One data shard -> its published attribution shard; rows written."""
    torch.set_num_threads(threads)
    return _attributor(spec)(in_uri, out_uri)


class ShardActor:
    """One model on one GPU for a whole attribution pass."""

    def attribute(self, spec: AttributionPass, threads: int, in_uri: str, out_uri: str) -> int:
        return attribute_shard(spec, threads, in_uri, out_uri)


def _warm() -> None:
    """Import what the stage functions need, so that later tasks find this worker process ready."""
    import raypipe.stages.partition  # noqa: F401
    import raypipe.stages.prune  # noqa: F401
    import raypipe.stages.train  # noqa: F401


def warm_up(processes: int, placement: dict[str, float]) -> list[ray.ObjectRef]:
    """Start `processes` worker processes importing raypipe's stage modules (spread over the nodes that
    have CPUs), without waiting for them. Each holds a token 0.01 CPU in Ray's books: importing must not
    keep other tasks waiting, and the driver's own work runs beside it."""
    task = ray.remote(_warm).options(num_cpus=0.01, resources=placement, scheduling_strategy="SPREAD")
    return [task.remote() for _ in range(processes)]


def run_bounded(
    submit: Callable[[Any], ray.ObjectRef],
    items: Sequence[Any],
    limit: int,
    desc: str,
    log: Callable[[str], None],
) -> list[Any]:
    """submit(item) for every item, at most `limit` in flight -> the results, in item order; a
    progress line about every 5 s."""
    refs: list[ray.ObjectRef | None] = [None] * len(items)
    in_flight: dict[ray.ObjectRef, int] = {}
    start, last, done, next_item = time.perf_counter(), 0.0, 0, 0
    while next_item < len(items) or in_flight:
        while next_item < len(items) and len(in_flight) < limit:
            refs[next_item] = submit(items[next_item])
            in_flight[refs[next_item]] = next_item
            next_item += 1
        ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=5.0)
        for ref in ready:
            del in_flight[ref]
        done += len(ready)
        now = time.perf_counter() - start
        if len(items) > 1 and (now - last > 5 or done == len(items)):
            log(f"  {desc}: {done}/{len(items)} shards ({now:.1f} s)")
            last = now
    return ray.get(refs)


def attribute_in_tasks(
    spec: AttributionPass,
    jobs: list[tuple[str, str]],
    concurrent: int,
    cpus: float,
    placement: dict[str, float],
    log: Callable[[str], None],
) -> int:
    """Every (data shard, output shard) job in a Ray task, `concurrent` at a time -> rows written."""
    task = ray.remote(attribute_shard).options(num_cpus=cpus, resources=placement)
    spec_ref, threads = ray.put(spec), max(1, int(cpus))
    rows = run_bounded(lambda job: task.remote(spec_ref, threads, *job), jobs, concurrent, "attribution", log)
    return int(sum(rows))


def attribute_on_actors(
    spec: AttributionPass,
    jobs: list[tuple[str, str]],
    actors: int,
    cpus: float,
    gpus: float,
    placement: dict[str, float],
) -> int:
    """Every job on a pool of `actors` actors (a GPU each), one model per actor -> rows written."""
    actor = ray.remote(ShardActor).options(
        num_cpus=cpus, num_gpus=gpus, resources=placement, max_restarts=-1, max_task_retries=-1
    )
    pool = ray.util.ActorPool([actor.remote() for _ in range(actors)])
    threads = max(1, int(cpus))
    return int(sum(pool.map_unordered(lambda a, job: a.attribute.remote(spec, threads, *job), jobs)))
