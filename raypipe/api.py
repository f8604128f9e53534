"""The Python API, mirroring the CLI: ``raypipe.run(config, out) -> report``."""

from __future__ import annotations

from typing import Any

from raypipe.config import Config


def make_executor(config: Config, log=print):
    if config.run.executor == "ray":
        from raypipe.distributed.ray_executor import RayExecutor

        return RayExecutor(config, log)
    from raypipe.executors import LocalExecutor

    return LocalExecutor(log)


def run(config: Config, out: str, from_stage: str | None = None, log=print) -> dict[str, Any]:
    from raypipe import pipeline

    executor = make_executor(config, log)
    try:
        return pipeline.run(config, out, executor, from_stage, log)
    finally:
        executor.close()
