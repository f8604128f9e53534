"""The stage table of one RLAP run, top to bottom, and the runner that skips or resumes by manifest.

    data -> initial -> attribution -> partition -> prune -> l_ft, f_ft   (the repair)
                                      partition ----------> retrain      (the baseline)
    every route -> report

`STAGES` declares each stage once: its name, the stages it reads, the settings its output depends
on, and its body (a call of its module in `raypipe.stages`). `raypipe run` runs the whole table; a
sweep runs the data and initial stages once, the attribution once per rule, and each trial runs the
same table from the partition on under its own folder (`raypipe.layout.SweepLayout`).

Each stage writes its folder and finishes by writing ``_manifest.json`` with the fingerprint of its
settings and of its inputs' manifests. A rerun skips a stage whose manifest matches; a changed
setting changes that stage's fingerprint and so every stage downstream of it; `from_stage` forces a
stage and everything after it. A stage that died half way left ``_pending.json`` with its
fingerprint: a rerun with the same fingerprint keeps what it had finished (attribution shards, a
training checkpoint), any other fingerprint clears the stage first.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from raypipe import layout, storage
from raypipe.config import REPAIR_ROUTES, Config, dump_config
from raypipe.core.models import check_signature, model_signature, saved_signature
from raypipe.errors import ConfigError, RaypipeError
from raypipe.layout import RunLayout
from raypipe.stages import Executor, attribution, partition, prune
from raypipe.stages import data as data_stage
from raypipe.stages.train import TrainRequest
from raypipe.training.checkpoint import load_model, save_model
from raypipe.training.loop import evaluate, resolve_device


@dataclass(frozen=True)
class Stage:
    name: str
    inputs: tuple[str, ...]
    settings: Callable[[Config], Any]  # JSON-able: what the output depends on besides the inputs
    body: Callable[[Run, str], dict[str, Any]]  # (the run, this stage's folder) -> summary
    enabled: Callable[[Config], bool] = lambda cfg: True


def _asdict(section: Any) -> Any:
    return dataclasses.asdict(section)


# ---------------------------------------------------------------------------------------------
# The bodies.


def _data(r: Run, uri: str) -> dict[str, Any]:
    return data_stage.run(r.config.data, r.config.noise, uri, r.log)


def records_trajectory(cfg: Config) -> bool:
    """The training trajectory is a detection signal when raypipe trains the initial model itself. It is
    recorded whatever detection.signal says, so that changing the signal reruns only the partition."""
    return cfg.detection.aum_epochs > 0 and cfg.model.checkpoint is None


def early_model_epoch(cfg: Config) -> int:
    """The epoch whose initial model is kept as ``early_model.pt`` (its probe space is a detection signal's):
    detection.early_epoch when raypipe trains the initial model for more epochs than that, else 0 (none)."""
    trains = cfg.model.checkpoint is None and cfg.detection.early_epoch < cfg.initial.epochs
    return cfg.detection.early_epoch if trains else 0


def train_request(r: Run, route: str, out_uri: str) -> TrainRequest:
    cfg, lay = r.config, r.layout
    repair = route in ("l_ft", "f_ft")
    trajectory = route == "initial" and records_trajectory(cfg)
    return TrainRequest(
        route,
        cfg.section(route),
        lay.stage("data"),
        out_uri,
        cfg.model,
        cfg.run.seed,
        partition_uri=None if route == "initial" else lay.stage("partition"),
        init_model_uri=lay.model("prune") if repair else None,
        device=cfg.run.device,
        trajectory_epochs=cfg.detection.aum_epochs if trajectory else 0,
        early_loss_epoch=cfg.detection.early_loss_epoch,
        early_model_epoch=early_model_epoch(cfg) if route == "initial" else 0,
        val_uri=r.validate_on if route != "initial" else None,
    )


def _initial(r: Run, uri: str) -> dict[str, Any]:
    cfg = r.config
    if cfg.model.checkpoint is None:  # trained here to convergence on the noisy data
        return r.executor.train(train_request(r, "initial", uri))
    data = r.summary("data")
    signature = model_signature(cfg.model, tuple(data["sample_shape"]), data["num_classes"])
    model, _, extra = load_model(cfg.model.checkpoint, expect=signature)
    save_model(layout.model_file(uri), model, signature, extra)
    test = data_stage.read_split(r.layout.stage("data"), "test")
    return {**evaluate(model, test.x, test.label, resolve_device("cpu")), "given": cfg.model.checkpoint}


def _initial_settings(cfg: Config) -> dict[str, Any]:
    return {
        "trajectory": [cfg.detection.aum_epochs, cfg.detection.early_loss_epoch] if records_trajectory(cfg) else None,
        "early_model_epoch": early_model_epoch(cfg),
        "model": _asdict(cfg.model),
        "seed": cfg.run.seed,
        "train": _asdict(cfg.initial) if cfg.model.checkpoint is None else None,
        "checkpoint_sha256": storage.file_digest(cfg.model.checkpoint) if cfg.model.checkpoint else None,
    }


def _attribution(r: Run, uri: str) -> dict[str, Any]:
    """Only the shards without a finished output are computed (an interrupted run resumes). The early initial
    model, when the training kept one, adds its probe activations (`probe_early`) in the same pass."""
    cfg, data = r.config, r.summary("data")
    rule = cfg.attribution.rule
    early = layout.early_model_file(r.layout.stage("initial"))
    probe_models = {"early": early} if early_model_epoch(cfg) and storage.exists(early) else {}
    jobs = attribution.pending_shards(data_stage.train_shards(r.layout.stage("data")), uri)
    r.log(f"[attribution] rule {rule}: {len(jobs)} of {data['n_shards']} shards to compute")
    rows = r.executor.attribute(
        r.layout.model("initial"), jobs, rule, cfg.attribution.batch_size, cfg.run.device, probe_models
    )
    probe_columns = ["probe", *(f"probe_{name}" for name in probe_models)]
    return {"rule": rule, "rows": data["rows"]["train"], "rows_computed": rows, "probe_columns": probe_columns}


def missing_signals(cfg: Config) -> dict[str, str]:
    """The detection signals this run cannot have, and why (the report says so)."""
    missing = {}
    if cfg.model.checkpoint is not None:
        why = "model.checkpoint is given: raypipe did not train it, so it has no"
        missing["trajectory"] = f"{why} training trajectory (aum, early_loss, wrong_events)"
        missing["knn_early"] = f"{why} early checkpoint"
    else:
        if cfg.detection.aum_epochs == 0:
            missing["trajectory"] = "detection.aum_epochs=0: no training trajectory recorded"
        if not early_model_epoch(cfg):
            missing["knn_early"] = (
                f"no early checkpoint (detection.early_epoch={cfg.detection.early_epoch}, "
                f"initial.epochs={cfg.initial.epochs})"
            )
    return missing


def _partition(r: Run, uri: str) -> dict[str, Any]:
    cfg, data = r.config, r.summary("data")
    return partition.run(
        r.layout.stage("attribution"),
        uri,
        cfg.partition,
        cfg.detection,
        cfg.run.seed,
        data["rows"]["train"],
        data["num_classes"],
        layout.trajectory_dir(r.layout.stage("initial")),
        r.executor,
        r.log,
        tuple(r.summary("attribution").get("probe_columns", ["probe"])),
        missing_signals(cfg),
    )


def _prune(r: Run, uri: str) -> dict[str, Any]:
    lay = r.layout
    return prune.run(
        lay.model("initial"), lay.stage("attribution"), lay.stage("partition"), uri, r.config.prune, r.executor, r.log
    )


def _route(route: str) -> Stage:
    """A repair route (from the pruned model) or the retrain baseline (a fresh model), on the clean part."""

    def settings(cfg: Config) -> dict[str, Any]:
        out = {"train": _asdict(cfg.section(route)), "seed": cfg.run.seed}
        return {**out, "model": _asdict(cfg.model)} if route == "retrain" else out

    return Stage(
        route,
        ("data", "partition") if route == "retrain" else ("data", "partition", "prune"),
        settings,
        lambda r, uri: r.executor.train(train_request(r, route, uri)),
        enabled=lambda cfg: route in cfg.run.routes,
    )


STAGES: tuple[Stage, ...] = (
    Stage("data", (), lambda cfg: {"data": _asdict(cfg.data), "noise": _asdict(cfg.noise)}, _data),
    Stage("initial", ("data",), _initial_settings, _initial),
    Stage(
        "attribution",
        ("data", "initial"),
        lambda cfg: {"rule": cfg.attribution.rule, "early_model_epoch": early_model_epoch(cfg)},
        _attribution,
    ),
    Stage(
        "partition",
        ("attribution",),
        lambda cfg: {"partition": _asdict(cfg.partition), "detection": _asdict(cfg.detection), "seed": cfg.run.seed},
        _partition,
    ),
    Stage("prune", ("initial", "attribution", "partition"), lambda cfg: _asdict(cfg.prune), _prune),
    *(_route(route) for route in REPAIR_ROUTES),
)
STAGE_NAMES = tuple(s.name for s in STAGES)


# ---------------------------------------------------------------------------------------------
# The runner.


class Run:
    """The stages of one config under one layout, run by one executor. `validate_on`: a labelled set
    the training routes after the partition score after every epoch (a sweep trial's objective)."""

    def __init__(
        self,
        config: Config,
        run_layout: RunLayout,
        executor: Executor,
        log: Callable[[str], None] = print,
        from_stage: str | None = None,
        validate_on: str | None = None,
    ):
        if from_stage is not None and from_stage not in STAGE_NAMES:
            raise ConfigError(f"--from '{from_stage}' is not a stage; use one of {list(STAGE_NAMES)}")
        self.config, self.layout, self.executor, self.log = config, run_layout, executor, log
        self.from_index = STAGE_NAMES.index(from_stage) if from_stage else len(STAGE_NAMES)
        self.validate_on = validate_on
        self.manifests: dict[str, dict[str, Any]] = {}
        self.ran: list[str] = []  # stages computed (not skipped) in this invocation

    def manifest(self, name: str) -> dict[str, Any]:
        """A stage's manifest: run here, or finished earlier in its folder (a sweep's shared stages)."""
        if name not in self.manifests:
            found = storage.read_manifest(self.layout.stage(name))
            if found is None:
                raise RaypipeError(
                    f"stage '{name}' in '{self.layout.stage(name)}' is not finished; run the stages before it first"
                )
            self.manifests[name] = found
        return self.manifests[name]

    def summary(self, name: str) -> dict[str, Any]:
        return self.manifest(name)["summary"]

    def run(self, names: Iterable[str] | None = None) -> Run:
        """Run (or skip) the stages of the table named in `names` (default: all), in table order."""
        wanted = set(STAGE_NAMES if names is None else names)
        for stage in STAGES:
            if stage.name in wanted and stage.enabled(self.config):
                self.run_stage(stage)
        return self

    def run_stage(self, stage: Stage) -> dict[str, Any]:
        """Run `stage.body` unless a matching manifest says it is done -> its manifest."""
        stage_uri = self.layout.stage(stage.name)
        settings = stage.settings(self.config)
        input_fps = {i: self.manifest(i)["fingerprint"] for i in stage.inputs}
        fp = storage.fingerprint({"settings": settings, "inputs": input_fps})
        forced = stage.name in STAGE_NAMES and STAGE_NAMES.index(stage.name) >= self.from_index
        manifest = storage.read_manifest(stage_uri)
        if manifest is not None and manifest.get("fingerprint") == fp and not forced:
            self.log(f"[{stage.name}] up to date, skipped")
            self.manifests[stage.name] = manifest
            return manifest
        if stage.name in self.layout.shared:  # never recompute a folder other runs read
            raise RaypipeError(
                f"stage '{stage.name}' in the shared folder '{stage_uri}' does not match this run's settings; "
                "run the stages that own it first (a sweep's base) or use another output folder"
            )
        pending_uri = storage.join(stage_uri, layout.PENDING)
        resumable = storage.exists(pending_uri) and storage.read_json(pending_uri).get("fingerprint") == fp
        if not resumable or forced:
            storage.remove_tree(stage_uri)
        storage.write_json(pending_uri, {"fingerprint": fp})
        start = time.perf_counter()
        summary = stage.body(self, stage_uri)
        manifest = {
            "stage": stage.name,
            "fingerprint": fp,
            "settings": settings,
            "inputs": input_fps,
            "summary": summary,
            "seconds": time.perf_counter() - start,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        storage.write_manifest(stage_uri, manifest)  # last: now the stage counts as finished
        storage.remove_tree(pending_uri)
        self.manifests[stage.name] = manifest
        self.ran.append(stage.name)
        self.log(f"[{stage.name}] done in {manifest['seconds']:.1f} s")
        return manifest


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


def run(config: Config, run_uri: str, executor: Executor, from_stage: str | None = None, log=print) -> Run:
    """Run (or resume) every stage of `config` under `run_uri` -> the finished Run (its manifests)."""
    run_layout = RunLayout(storage.absolute(run_uri))  # every stage, wherever it runs, writes under one place
    if config.model.checkpoint is not None:
        check_given_checkpoint(config)  # before anything is written: a wrong checkpoint fails the run at once
    r = Run(config, run_layout, executor, log, from_stage)  # checks from_stage before anything is written
    storage.makedirs(run_layout.root)
    storage.write_bytes(run_layout.config_file, dump_config(config).encode())
    return r.run()
