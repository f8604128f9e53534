"""The stage graph of one RLAP run, top to bottom, with skip / resume by manifest.

    data -> initial -> attribution -> partition -> prune -> l_ft, f_ft   (the repair)
                                      partition ----------> retrain      (the baseline)
    every route -> report

Each stage writes under ``<run>/<stage>/`` and finishes by writing ``_manifest.json`` holding the
fingerprint of its settings and of its inputs' manifests. A rerun skips a stage whose manifest
matches; a changed setting changes that stage's fingerprint and so every stage downstream of it;
``from_stage`` forces a stage and everything after it. A stage that died half way left a
``_pending.json`` with its fingerprint: a rerun with the same fingerprint keeps the shards it had
finished (attribution resumes), any other fingerprint clears the stage first.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

from raypipe import storage
from raypipe.config import Config, dump_config
from raypipe.errors import ConfigError
from raypipe.core.models import check_signature, load_model, model_signature, save_model, saved_signature
from raypipe.stages import attribution as attribute, partition, prune
from raypipe.stages import data as prepare
from raypipe.stages.train import TrainRequest
from raypipe.training.loop import evaluate, resolve_device

STAGES = ("data", "initial", "attribution", "partition", "prune", "l_ft", "f_ft", "retrain")
PENDING = "_pending.json"


class Pipeline:
    def __init__(self, config: Config, run_uri: str, executor, from_stage: str | None = None, log=print):
        if from_stage is not None and from_stage not in STAGES:
            raise ConfigError(f"--from '{from_stage}' is not a stage; use one of {list(STAGES)}")
        self.config = config
        self.run_uri = run_uri
        self.executor = executor
        self.from_index = STAGES.index(from_stage) if from_stage else len(STAGES)
        self.log = log
        self.manifests: dict[str, dict[str, Any]] = {}
        self.ran: list[str] = []  # stages computed (not skipped) in this invocation

    def uri(self, stage: str) -> str:
        return storage.join(self.run_uri, stage)

    def stage(self, name: str, settings: Any, inputs: list[str], body: Callable[[str], dict[str, Any]]):
        """Run `body(stage_uri) -> summary` unless a matching manifest says it is done."""
        stage_uri = self.uri(name)
        input_fps = {i: self.manifests[i]["fingerprint"] for i in inputs}
        fp = storage.fingerprint({"settings": settings, "inputs": input_fps})
        forced = STAGES.index(name) >= self.from_index
        manifest = storage.read_manifest(stage_uri)
        if manifest is not None and manifest.get("fingerprint") == fp and not forced:
            self.log(f"[{name}] up to date, skipped")
            self.manifests[name] = manifest
            return manifest
        pending_uri = storage.join(stage_uri, PENDING)
        resumable = storage.exists(pending_uri) and storage.read_json(pending_uri).get("fingerprint") == fp
        if not resumable or forced:
            storage.remove_tree(stage_uri)
        storage.write_json(pending_uri, {"fingerprint": fp})
        start = time.perf_counter()
        summary = body(stage_uri)
        manifest = {
            "stage": name,
            "fingerprint": fp,
            "settings": settings,
            "inputs": input_fps,
            "summary": summary,
            "seconds": time.perf_counter() - start,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        storage.write_manifest(stage_uri, manifest)  # last: now the stage counts as finished
        storage.remove_tree(pending_uri)
        self.manifests[name] = manifest
        self.ran.append(name)
        self.log(f"[{name}] done in {manifest['seconds']:.1f} s")
        return manifest


def _settings(obj: Any) -> Any:
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj


def check_given_checkpoint(cfg: Config) -> None:
    """`model.checkpoint` exists, loads safely (weights only) and has the configured architecture, probe
    width and hidden width. The input shape and class count are checked by `initial` once the data is known."""
    uri = cfg.model.checkpoint
    if not storage.exists(uri):
        raise ConfigError(
            f"config key 'model.checkpoint': '{uri}' does not exist; point it at a raypipe checkpoint (model.pt) "
            "or unset it to train the initial model"
        )
    saved = saved_signature(storage.load_torch(uri), uri)
    expect = {**saved, **{k: getattr(cfg.model, k) for k in ("name", "probe_width", "hidden_width")}}
    check_signature(saved, expect, uri)


def train_request(
    p: Pipeline, route: str, out_uri: str, init: str | None = None, partition_uri: str | None = None
) -> TrainRequest:
    """The training request of `route` under pipeline `p` (data from p's `data` stage)."""
    cfg = p.config
    # The training trajectory is a detection signal when raypipe trains the initial model itself.
    # Recorded whatever detection.signal says, so that changing the signal reruns only the partition.
    trajectory = route == "initial" and records_trajectory(cfg)
    return TrainRequest(
        route,
        cfg.section(route),
        p.uri("data"),
        out_uri,
        cfg.model,
        cfg.run.seed,
        partition_uri,
        init,
        cfg.run.device,
        trajectory_epochs=cfg.detection.aum_epochs if trajectory else 0,
        early_loss_epoch=cfg.detection.early_loss_epoch,
    )


def records_trajectory(cfg: Config) -> bool:
    return cfg.detection.aum_epochs > 0 and cfg.model.checkpoint is None


def data_and_initial(p: Pipeline, executor, log=print) -> tuple[dict[str, Any], dict[str, Any]]:
    """Stages 1 and 2, shared by `run` and the sweep's base: -> (data summary, model signature)."""
    cfg = p.config
    # 1. Data: source -> splits -> noise -> Parquet shards.
    data = p.stage(
        "data", {"data": _settings(cfg.data), "noise": _settings(cfg.noise)}, [], lambda uri: prepare.run(cfg, uri, log)
    )["summary"]
    signature = model_signature(cfg.model, tuple(data["sample_shape"]), data["num_classes"])

    # 2. The model to repair: trained here to convergence on the noisy data, or given.
    def initial_body(uri: str) -> dict[str, Any]:
        if cfg.model.checkpoint is None:
            return executor.train(train_request(p, "initial", uri))
        model, _, extra = load_model(cfg.model.checkpoint, expect=signature)
        save_model(storage.join(uri, "model.pt"), model, signature, extra)
        test = prepare.read_split(p.uri("data"), "test")
        return {**evaluate(model, test.x, test.label, resolve_device("cpu")), "given": cfg.model.checkpoint}

    initial_settings = {
        "trajectory": [cfg.detection.aum_epochs, cfg.detection.early_loss_epoch] if records_trajectory(cfg) else None,
        "model": _settings(cfg.model),
        "seed": cfg.run.seed,
        "train": _settings(cfg.initial) if cfg.model.checkpoint is None else None,
        "checkpoint_sha256": storage.file_digest(cfg.model.checkpoint) if cfg.model.checkpoint else None,
    }
    p.stage("initial", initial_settings, ["data"], initial_body)
    return data, signature


def attribution_stage(
    p: Pipeline, rule: str, data_uri: str, data: dict[str, Any], initial_model: str, executor, log=print
) -> dict[str, Any]:
    """Stage 3 under `p` for one rule (`raypipe run`, and the sweep once per rule): only the shards
    without a finished output are computed."""
    cfg = p.config

    def body(uri: str) -> dict[str, Any]:
        jobs = attribute.pending_shards(prepare.train_shards(data_uri), uri)
        log(f"[attribution] rule {rule}: {len(jobs)} of {data['n_shards']} shards to compute")
        rows = executor.attribute(initial_model, jobs, rule, cfg.attribution.batch_size, cfg.run.device)
        return {"rule": rule, "rows": data["rows"]["train"], "rows_computed": rows}

    return p.stage("attribution", {"rule": rule}, ["data", "initial"], body)


def run(config: Config, run_uri: str, executor=None, from_stage: str | None = None, log=print) -> dict[str, Any]:
    """Run (or resume) the whole RLAP pipeline under `run_uri`; return the report."""
    from raypipe.executors import LocalExecutor
    from raypipe.report.report import write_report

    executor = executor or LocalExecutor(log)
    cfg = config
    run_uri = storage.absolute(run_uri)  # every stage, wherever it runs, writes under the same place
    if cfg.model.checkpoint is not None:
        check_given_checkpoint(cfg)  # before anything is written: a wrong checkpoint fails the run at once
    storage.makedirs(run_uri)
    storage.write_bytes(storage.join(run_uri, "config.yaml"), dump_config(cfg).encode())
    p = Pipeline(cfg, run_uri, executor, from_stage, log)

    data, _ = data_and_initial(p, executor, log)
    initial_model = storage.join(p.uri("initial"), "model.pt")

    # 3. Attribution, shard by shard (finished shards of an interrupted run are kept).
    attribution_stage(p, cfg.attribution.rule, p.uri("data"), data, initial_model, executor, log)

    # 4. Partition: per-sample detection signals, p_noisy for every sample, the split at tau.
    trajectory_uri = storage.join(p.uri("initial"), "trajectory")
    p.stage(
        "partition",
        {"partition": _settings(cfg.partition), "detection": _settings(cfg.detection), "seed": cfg.run.seed},
        ["attribution"],
        lambda uri: partition.run(
            p.uri("attribution"),
            uri,
            cfg.partition,
            cfg.detection,
            cfg.run.seed,
            data["rows"]["train"],
            data["num_classes"],
            trajectory_uri,
            executor,
            log,
        ),
    )

    # 5. Sensitivity regression from per-shard sums, persistent pruning.
    p.stage(
        "prune",
        _settings(cfg.prune),
        ["initial", "attribution", "partition"],
        lambda uri: prune.run(initial_model, p.uri("attribution"), p.uri("partition"), uri, cfg.prune, executor, log),
    )

    # 6. Repair routes from the pruned model, and the retrain baseline, on the clean part.
    pruned_model = storage.join(p.uri("prune"), "model.pt")
    for route in ("l_ft", "f_ft", "retrain"):
        if route not in cfg.run.routes:
            continue
        init = None if route == "retrain" else pruned_model
        inputs = ["data", "partition"] + ([] if route == "retrain" else ["prune"])
        settings = {"train": _settings(cfg.section(route)), "seed": cfg.run.seed}
        if route == "retrain":
            settings["model"] = _settings(cfg.model)
        p.stage(
            route,
            settings,
            inputs,
            lambda uri, r=route, i=init: executor.train(train_request(p, r, uri, i, p.uri("partition"))),
        )

    # 7. Report (always rewritten: it is cheap and reads only manifests and small files).
    return write_report(run_uri, cfg, p.manifests, log)
