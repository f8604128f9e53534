"""The stage table of one RLAP run, top to bottom, and the runner that skips or resumes by manifest.

    data -> initial -> attribution -> partition -> prune -> l_ft, f_ft   (the repair)
                                      partition ----------> retrain      (the baseline)
    every route -> report

`STAGES` declares each stage once: its name, the stages it reads, the settings its output depends
on, and its body (a call of its module in `raypipe.stages`). `raypipe run` runs the whole table; a
sweep runs the data and initial stages once, the attribution once per rule, and each trial runs the
same table from the partition on under its own folder (`raypipe.layout.SweepLayout`).

Each stage writes its folder and finishes by writing ``_manifest.json`` with the fingerprint of its
settings and of its inputs' manifests, and the list of the files it wrote (size, Parquet row count).
The data stage's settings include what its input files hold (`raypipe.data.input_files`), so data
changed at the same path is new data. A rerun skips a stage whose manifest matches and whose files
are all there as written; a changed setting changes that stage's fingerprint and so every stage
downstream of it; a stage whose files are missing or damaged is computed again under a new revision
(part of its fingerprint), so every stage downstream of it reruns too; `from_stage` forces a stage
and everything after it. A manifest that cannot be read counts as unfinished. A stage that died half
way left ``_pending.json`` with its fingerprint: a rerun with the same fingerprint keeps what it had
finished (attribution shards, a training checkpoint), any other fingerprint clears the stage first.
Before the first stage after `data`, the settings are checked against the data
(`raypipe.preflight.check_against_data`).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from raypipe import layout, storage
from raypipe.config import FINE_TUNE_ROUTES, REPAIR_ROUTES, Config, dump_config
from raypipe.data import input_files
from raypipe.errors import ConfigError, DamagedFileError, RaypipeError
from raypipe.layout import RunLayout
from raypipe.preflight import check_against_data
from raypipe.report.report import remove_report
from raypipe.stages import Executor, attribution, partition, prune
from raypipe.stages import data as data_stage
from raypipe.stages.signals import early_model_epoch, missing_signals, records_trajectory
from raypipe.stages.train import TrainRequest, publish_given_model


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


def _data_settings(cfg: Config) -> dict[str, Any]:
    """The data's settings and what its input files hold now (size, time, hash or object version)."""
    return {
        "layout": layout.LAYOUT_VERSION,  # a data stage written under another layout is computed again
        "data": _asdict(cfg.data),
        "noise": _asdict(cfg.noise),
        "files": storage.files_fingerprint(input_files(cfg.data)),
    }


def train_request(r: Run, route: str, out_uri: str) -> TrainRequest:
    cfg, lay = r.config, r.layout
    repair = route in FINE_TUNE_ROUTES
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
        attribution_uri=lay.stage("attribution") if route == "l_ft" else None,
    )


def _initial(r: Run, uri: str) -> dict[str, Any]:
    cfg = r.config
    if cfg.model.checkpoint is None:  # trained here to convergence on the noisy data
        return r.executor.train(train_request(r, "initial", uri))
    data = r.summary("data")
    return publish_given_model(cfg.model, r.layout.stage("data"), data["sample_shape"], data["num_classes"], uri)


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
    keep_features = "l_ft" in cfg.run.routes  # L-FT trains the head on them (raypipe.stages.attribution)
    spec = attribution.AttributionPass(
        r.layout.model("initial"),
        rule,
        cfg.attribution.batch_size,
        cfg.run.device,
        keep_features,
        tuple(probe_models.items()),
    )
    rows = r.executor.attribute(spec, jobs)
    attribution.attribute_val(r.executor, spec, r.layout.stage("data"), uri, data["rows"].get("val", 0))
    probe_columns = ["probe", *(f"probe_{name}" for name in probe_models)]
    return {"rule": rule, "rows": data["rows"]["train"], "rows_computed": rows, "probe_columns": probe_columns}


def _partition(r: Run, uri: str) -> dict[str, Any]:
    cfg, data = r.config, r.summary("data")
    return partition.run(
        r.layout.stage("attribution"),
        r.layout.stage("data"),
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
        truth_known=data.get("ground_truth", "") is not None,  # older data stages: injected noise, known
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

    inputs = {"retrain": ("data", "partition"), "l_ft": ("data", "attribution", "partition", "prune")}
    return Stage(
        route,
        inputs.get(route, ("data", "partition", "prune")),
        settings,
        lambda r, uri: r.executor.train(train_request(r, route, uri)),
        enabled=lambda cfg: route in cfg.run.routes,
    )


STAGES: tuple[Stage, ...] = (
    Stage("data", (), _data_settings, _data),
    Stage("initial", ("data",), _initial_settings, _initial),
    Stage(
        "attribution",
        ("data", "initial"),
        lambda cfg: {"rule": cfg.attribution.rule, "early_model_epoch": early_model_epoch(cfg), "val_split": True},
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
DETECTION_STAGES = ("data", "initial", "attribution", "partition")  # `raypipe find-issues`: up to the label issues


# ---------------------------------------------------------------------------------------------
# The runner.


SWEEP_AGAIN = "the same `raypipe sweep` command) to compute it again"
SHARED_FIRST = "run the stages that own it first (a sweep's base) or use another output folder"


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
        check_from(from_stage)
        self.config, self.layout, self.executor, self.log = config, run_layout, executor, log
        self.from_index = STAGE_NAMES.index(from_stage) if from_stage else len(STAGE_NAMES)
        self.validate_on = validate_on
        self.manifests: dict[str, dict[str, Any]] = {}
        self.ran: list[str] = []  # stages computed (not skipped) in this invocation
        self.data_checked = False  # the settings against the data (raypipe.preflight.check_against_data)

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
        """Run (or skip) the stages of the table named in `names` (default: all). A stage starts once the
        stages it reads are done; the settings are checked against the data before the first stage after
        it. Independent training routes go to an executor with `concurrent_stages` together, each from its
        own thread (the Ray executor runs side by side what fits on the cluster); any other executor gets
        one stage at a time, in table order."""
        wanted = set(STAGE_NAMES if names is None else names)
        todo = [s for s in STAGES if s.name in wanted and s.enabled(self.config)]
        while todo:
            waiting = {s.name for s in todo}
            ready = [s for s in todo if waiting.isdisjoint(s.inputs)]
            if ready[0].name != "data" and not self.data_checked:
                check_against_data(self.config, self.summary("data"))
                self.data_checked = True
            routes = [s for s in ready if s.name in REPAIR_ROUTES]
            together = getattr(self.executor, "concurrent_stages", False) and ready[0] in routes and len(routes) > 1
            group = routes if together else ready[:1]
            _run_together(self.run_stage, group)
            todo = [s for s in todo if s not in group]
        return self

    def run_stage(self, stage: Stage) -> dict[str, Any]:
        """Run `stage.body` unless a matching manifest says it is done and its files are intact -> its manifest."""
        stage_uri = self.layout.stage(stage.name)
        settings = stage.settings(self.config)
        input_fps = {i: self.manifest(i)["fingerprint"] for i in stage.inputs}
        forced = stage.name in STAGE_NAMES and STAGE_NAMES.index(stage.name) >= self.from_index
        manifest = storage.read_manifest(stage_uri)  # None: missing or unreadable, so unfinished
        if manifest is not None and not forced:
            revision = int(manifest.get("revision", 0))
            if manifest["fingerprint"] == stage_fingerprint(settings, input_fps, revision):
                damage = storage.check_outputs(stage_uri, manifest.get("outputs", {}))
                if damage is None:
                    self.log(f"[{stage.name}] up to date, skipped")
                    self.manifests[stage.name] = manifest
                    return manifest
                self._refuse_shared(
                    stage.name, f"is damaged ({damage}); rerun the command that made it (a sweep: {SWEEP_AGAIN})"
                )
                self.log(f"[{stage.name}] {damage}: computing the stage again, and every stage after it")
                # a new revision, so a new fingerprint: every stage downstream reruns on the recomputed outputs
                return self._compute(stage, stage_uri, settings, input_fps, revision + 1, forced)
        self._refuse_shared(stage.name, f"does not match this run's settings; {SHARED_FIRST}")
        return self._compute(stage, stage_uri, settings, input_fps, self._revision(stage_uri, manifest), forced)

    def _refuse_shared(self, name: str, why: str) -> None:
        """A stage in a shared folder (a sweep's base) is never recomputed by a run that only reads it."""
        if name in self.layout.shared:
            raise RaypipeError(f"stage '{name}' in the shared folder '{self.layout.stage(name)}' {why}")

    def _revision(self, stage_uri: str, manifest: dict[str, Any] | None) -> int:
        """The revision of a stage computed without a matching manifest: that of its interrupted computation
        (it resumes, and stays distinct from what came before), or a new one over a manifest that cannot be
        read (what the stages after it read may have been other outputs)."""
        if manifest is None and storage.exists(storage.join(stage_uri, layout.MANIFEST)):
            self.log(
                f"[{stage_uri.rsplit('/', 1)[-1]}] its {layout.MANIFEST} cannot be read: computing the stage again"
            )
            return int(time.time())
        pending = storage.read_json_or_none(storage.join(stage_uri, layout.PENDING))
        return int(pending.get("revision", 0)) if isinstance(pending, dict) else 0

    def _compute(self, stage: Stage, stage_uri: str, settings, input_fps, revision: int, forced: bool):
        if not self.ran:
            remove_report(self.layout, self.log)
        fp = stage_fingerprint(settings, input_fps, revision)
        pending_uri = storage.join(stage_uri, layout.PENDING)
        pending = storage.read_json_or_none(pending_uri)
        resumable = isinstance(pending, dict) and pending.get("fingerprint") == fp
        if not resumable or forced:
            storage.remove_tree(stage_uri)
        storage.write_json(pending_uri, {"fingerprint": fp, "revision": revision})
        start = time.perf_counter()
        try:
            summary = stage.body(self, stage_uri)
        except DamagedFileError as e:
            raise self._damaged(e, stage.name) from None
        manifest = {
            "stage": stage.name,
            "fingerprint": fp,
            **({"revision": revision} if revision else {}),
            "settings": settings,
            "inputs": input_fps,
            "summary": summary,
            "outputs": storage.describe_outputs(stage_uri, layout.UNTRACKED),
            "seconds": time.perf_counter() - start,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        storage.write_manifest(stage_uri, manifest)  # last: now the stage counts as finished
        storage.remove_tree(pending_uri)
        self.manifests[stage.name] = manifest
        self.ran.append(stage.name)
        self.log(f"[{stage.name}] done in {manifest['seconds']:.1f} s")
        return manifest

    def _damaged(self, error: DamagedFileError, running: str) -> RaypipeError:
        """A file found damaged while a stage read it: the stage that wrote it is made unfinished (or, for the
        running stage, the file removed), so that the next run computes it again."""
        owner = next((n for n in STAGE_NAMES if error.uri.startswith(self.layout.stage(n) + "/")), None)
        if owner is None:
            return error
        if owner in self.layout.shared:
            return RaypipeError(f"{error}; it belongs to the shared stage '{owner}': rerun the command that made it")
        if owner == running:
            storage.remove_tree(error.uri)
            return RaypipeError(f"{error}; it was removed: rerun the same command to compute it again")
        owner_uri = self.layout.stage(owner)
        revision = int((storage.read_manifest(owner_uri) or {}).get("revision", 0)) + 1  # so the stages after rerun
        mark = {"fingerprint": None, "revision": revision, "damaged": error.uri}
        storage.write_json(storage.join(owner_uri, layout.PENDING), mark)
        storage.remove_tree(storage.join(owner_uri, layout.MANIFEST))  # after the pending mark: never a bare folder
        return RaypipeError(f"{error}; stage '{owner}' is now unfinished: rerun the same command to compute it again")


def stage_fingerprint(settings: Any, input_fps: dict[str, str], revision: int = 0) -> str:
    """What a stage's outputs depend on: its settings, its inputs' fingerprints, and how many times it was
    computed again after its files were found damaged (0 for almost every stage)."""
    return storage.fingerprint(
        {"settings": settings, "inputs": input_fps, **({"revision": revision} if revision else {})}
    )


def check_from(from_stage: str | None) -> None:
    if from_stage is not None and from_stage not in STAGE_NAMES:
        raise ConfigError(f"--from '{from_stage}' is not a stage; use one of {list(STAGE_NAMES)}")


def _run_together(run_stage: Callable[[Stage], Any], stages: list[Stage]) -> None:
    """run_stage(s) for every stage, each in its own (daemon) thread when there are several; the first
    failure is raised once every stage has ended (the others finish and keep their manifests)."""
    if len(stages) == 1:
        run_stage(stages[0])
        return
    failures: list[BaseException] = []

    def body(stage: Stage) -> None:
        try:
            run_stage(stage)
        except BaseException as e:  # re-raised below, in the caller's thread
            failures.append(e)

    threads = [threading.Thread(target=body, args=(s,), name=f"raypipe-{s.name}", daemon=True) for s in stages]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        raise failures[0]


def run(
    config: Config,
    run_uri: str,
    executor: Executor,
    from_stage: str | None = None,
    log=print,
    stages: Iterable[str] | None = None,
) -> Run:
    """Run (or resume) every stage of `config` (or those in `stages`) under `run_uri` -> the finished Run."""
    run_layout = RunLayout(storage.absolute(run_uri))  # every stage, wherever it runs, writes under one place
    r = Run(config, run_layout, executor, log, from_stage)  # checks from_stage before anything is written
    storage.makedirs(run_layout.root)
    storage.write_bytes(run_layout.config_file, dump_config(config).encode())
    return r.run(stages)
