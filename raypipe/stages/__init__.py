"""The RLAP stages, one module each, named as the stage (data, train for every training stage,
attribution, partition (with `signals`, its per-shard detection signals), prune). Each stage is a
function from input URI(s) + its config to its output folder; stages hand over through files, never
live objects. The per-shard work functions are pure and run wherever an `Executor` sends them: this
process, or Ray tasks, actors and Train workers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    from raypipe.stages.attribution import AttributionPass
    from raypipe.stages.train import TrainRequest

T = TypeVar("T")
R = TypeVar("R")


class Executor(Protocol):
    """What a stage may ask of the place it runs (`raypipe.executors.LocalExecutor`, or the Ray executor)."""

    name: str
    # Whether the runner may hand it independent stages together, each from its own thread (the Ray
    # executor: each route on its own workers); False: one stage at a time, in table order.
    concurrent_stages: bool

    def map(self, fn: Callable[[T], R], items: Iterable[T], desc: str = "") -> list[R]:
        """[fn(item) for item in items], in order; fn is pure and idempotent (it may run anywhere, twice)."""
        ...

    def attribute(self, spec: AttributionPass, jobs: list[tuple[str, str]]) -> int:
        """Attribute every (data shard URI, output shard URI) job as `spec` says -> rows written."""
        ...

    def train(self, request: TrainRequest) -> dict[str, Any]:
        """Run one training request to its end (resuming from its checkpoint) -> the stage summary."""
        ...

    def close(self) -> None: ...
