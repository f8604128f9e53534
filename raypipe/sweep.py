"""The sweep without Ray: the search space, the shared stages, one trial's body, the outputs.

`raypipe sweep` searches the repair's settings: the partition threshold ``tau``, the prune
fraction, the attribution rule, the fine-tuning route (``l_ft`` / ``f_ft``), its learning rate and
its epochs (``sweep.*`` in the config). Ray Tune runs the trials and stops bad ones early (ASHA);
that wrapper is :mod:`raypipe.distributed.tune`. Everything here is plain Python over URIs.

Layout under ``<sweep>/`` (a local path, ``s3://`` or ``gs://``):

- ``base/data``, ``base/initial``: the data stage and the model to repair, computed **once**;
  ``base/<rule>/attribution``: the attributions, computed **once per rule** and read by every trial
  of that rule from Parquet (the pipeline's own stages and manifests, so a rerun skips them);
- ``trials/<trial_id>/``: a trial's own ``partition/`` and ``prune/`` stages, ``finetune.pt`` (the
  model after its last finished epoch, its optimizer state and the per-epoch history: a restarted
  trial resumes from it, a finished one replays it without training), ``events.jsonl`` (one line per
  start of the trial body), ``result.json``;
- ``tune/``: Ray Tune's experiment (results, experiment state; what ``Tuner.restore`` reads);
- ``trials.csv`` / ``trials.parquet``: every trial's settings, objective, epochs run and status;
- ``best/``: ``config.yaml`` (a full raypipe config: ``raypipe run`` with it repeats the best trial),
  ``model.pt`` (the best trial's repaired model) and ``report.json`` (its objective, its metrics on
  the clean test split, the initial model's for comparison);
- ``plots/objective.png``: the objective against tau, the prune fraction and the learning rate.

The objective is the accuracy on a validation split held out from the training data, after the
trial's last epoch (never the best epoch, never the test split). ``sweep.objective`` picks which:

- ``noisy``: the data stage's validation split with its *given* labels, corrupted at the same rate as
  the training labels: all that a user without clean data has. Under symmetric label noise, accuracy
  on noisy labels is an increasing function of the true accuracy (for rates below (C - 1) / C), so it
  ranks trials correctly, only compressed; under class-dependent noise it can mislead;
- ``trusted``: a small clean labelled set the user supplies (``sweep.trusted_path``, Parquet: written
  by raypipe's ``table_from_samples`` or in the parquet source's image / label format).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from raypipe import storage
from raypipe.config import Config, SweepConfig, dump_config
from raypipe.data import SampleSet
from raypipe.errors import ConfigError, DataError, RaypipeError
from raypipe.executors import LocalExecutor
from raypipe.core.models import checkpoint_dict, load_model, save_model
from raypipe.pipeline import Pipeline, attribution_stage, data_and_initial
from raypipe.stages import data as prepare, partition, prune
from raypipe.stages.train import TrainRequest, starting_model, training_samples
from raypipe.training.loop import evaluate, make_optimizer, resolve_device, train_epoch, trainable_parameters

METRIC = "val_accuracy"
FINETUNE_FILE = "finetune.pt"
# Axes of the grid, slowest-varying first (the order trials are listed and started in).
AXES = ("lr", "epochs", "route", "rule", "tau", "prune_fraction")
TABLE_COLUMNS = (
    "trial_id",
    *AXES,
    "epochs_run",
    METRIC,
    "val_macro_f1",
    "n_clean",
    "status",
    "message",
)


# ---------------------------------------------------------------------------------------------
# The search space.


@dataclass(frozen=True)
class TrialSpec:
    """The hyperparameters of one trial."""

    lr: float
    epochs: int
    route: str
    rule: str
    tau: float
    prune_fraction: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrialSpec:
        return cls(
            lr=float(d["lr"]),
            epochs=int(d["epochs"]),
            route=str(d["route"]),
            rule=str(d["rule"]),
            tau=float(d["tau"]),
            prune_fraction=float(d["prune_fraction"]),
        )


def trial_specs(cfg: SweepConfig) -> list[TrialSpec]:
    """Every combination of the axes (num_samples = 0 or >= their number), else num_samples distinct
    combinations drawn with cfg.seed. Grid order: `AXES`, the first varying slowest."""
    axes = [cfg.lr, cfg.epochs, cfg.routes, cfg.rules, cfg.tau, cfg.prune_fraction]
    combos = list(itertools.product(*axes))
    if 0 < cfg.num_samples < len(combos):
        pick = np.random.default_rng(cfg.seed).choice(len(combos), size=cfg.num_samples, replace=False)
        combos = [combos[i] for i in pick]
    return [TrialSpec(float(a), int(b), c, d, float(e), float(f)) for a, b, c, d, e, f in combos]


def trial_config(config: Config, spec: TrialSpec) -> Config:
    """The full raypipe config of one trial: `raypipe run` with it runs the same repair."""
    route_cfg = dataclasses.replace(config.section(spec.route), lr=spec.lr, epochs=spec.epochs)
    return dataclasses.replace(
        config,
        run=dataclasses.replace(config.run, routes=[spec.route]),
        attribution=dataclasses.replace(config.attribution, rule=spec.rule),
        partition=dataclasses.replace(config.partition, tau=spec.tau),
        prune=dataclasses.replace(config.prune, fraction=spec.prune_fraction),
        **{spec.route: route_cfg},
    ).validate()


# Settings that may change between an interrupted sweep and its resumption (where it runs, not what).
RESUMABLE_KEYS = (
    "ray",
    "run.executor",
    "run.device",
    "sweep.max_concurrent_trials",
    "sweep.cpus_per_trial",
    "sweep.gpus_per_trial",
    "sweep.workers_per_trial",
)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        full = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            out.update(_flatten(value, full))
        else:
            out[full] = value
    return out


def sweep_settings(config: Config) -> dict[str, Any]:
    """The flattened settings that define a sweep's trials (what a resumed sweep must share)."""
    flat = _flatten(config.to_dict())
    return {k: v for k, v in flat.items() if not any(k == r or k.startswith(r + ".") for r in RESUMABLE_KEYS)}


def check_resumable(config: Config, sweep_uri: str) -> None:
    """Refuse to resume a sweep that was started with other settings; record them on a first start."""
    uri = storage.join(sweep_uri, "sweep_settings.json")
    settings = json.loads(json.dumps(sweep_settings(config)))  # as JSON reads them back (lists, floats)
    if not storage.exists(uri):
        storage.write_json(uri, settings)
        return
    saved = storage.read_json(uri)
    changed = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
    if changed:
        raise ConfigError(
            f"config key '{changed[0]}': the sweep in '{sweep_uri}' was started with other settings "
            f"(changed: {', '.join(changed[:6])}{', ...' if len(changed) > 6 else ''}); use another --out, "
            f"or delete '{storage.join(sweep_uri, 'tune')}' and '{uri}' to start it again"
        )


# ---------------------------------------------------------------------------------------------
# Resources: pure arithmetic on ray.cluster_resources(), unit-tested without a cluster.


@dataclass(frozen=True)
class SweepPlan:
    # What Tune reserves for the trial function: the whole trial when it trains in-process, only the
    # driver's share when it starts Ray Train workers (which reserve their own).
    trial_resources: dict[str, float]
    max_concurrent: int
    workers: int  # Ray Train workers per trial; 1 = fine-tune in the trial's own process
    cpus_per_worker: float
    gpus_per_worker: float

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_worker > 0 or self.trial_resources.get("gpu", 0.0) > 0


def plan_sweep(resources: dict[str, float], cfg: SweepConfig, n_trials: int) -> SweepPlan:
    cpus, gpus = float(resources.get("CPU", 0.0)), float(resources.get("GPU", 0.0))
    if cfg.cpus_per_trial > cpus + 1e-9:
        raise ConfigError(
            f"config key 'sweep.cpus_per_trial': {cfg.cpus_per_trial} is more than the cluster's {cpus:g} CPUs; "
            "lower it (fractions such as 0.5 work)"
        )
    if cfg.gpus_per_trial > 0 and cfg.gpus_per_trial > gpus + 1e-9:
        raise ConfigError(
            f"config key 'sweep.gpus_per_trial': {cfg.gpus_per_trial} but the cluster has {gpus:g} GPUs; "
            "set sweep.gpus_per_trial=0 or lower it"
        )
    fit = math.floor(cpus / cfg.cpus_per_trial + 1e-9)
    if cfg.gpus_per_trial > 0:
        fit = min(fit, math.floor(gpus / cfg.gpus_per_trial + 1e-9))
    max_concurrent = cfg.max_concurrent_trials or fit
    max_concurrent = max(1, min(max_concurrent, fit, max(n_trials, 1)))
    w = cfg.workers_per_trial
    if w == 1:
        trial = {"cpu": cfg.cpus_per_trial, **({"gpu": cfg.gpus_per_trial} if cfg.gpus_per_trial else {})}
        return SweepPlan(trial, max_concurrent, 1, 0.0, 0.0)
    # The trial function only drives Ray Train (and partitions / prunes, which are light): a fifth of
    # the trial's CPUs, at most half a CPU; its workers share the rest, so trials never starve each other.
    driver = round(min(0.5, 0.2 * cfg.cpus_per_trial), 4)
    per_worker = round((cfg.cpus_per_trial - driver) / w, 4)
    return SweepPlan({"cpu": driver}, max_concurrent, w, per_worker, round(cfg.gpus_per_trial / w, 4))


# ---------------------------------------------------------------------------------------------
# Layout and the shared stages.


@dataclass(frozen=True)
class Layout:
    root: str

    @property
    def base(self) -> str:
        return storage.join(self.root, "base")

    @property
    def data(self) -> str:
        return storage.join(self.base, "data")

    @property
    def initial_model(self) -> str:
        return storage.join(self.base, "initial", "model.pt")

    def rule_root(self, rule: str) -> str:
        return storage.join(self.base, rule)

    def attribution(self, rule: str) -> str:
        return storage.join(self.rule_root(rule), "attribution")

    def trial(self, trial_id: str) -> str:
        return storage.join(self.root, "trials", trial_id)

    @property
    def tune(self) -> str:
        return storage.join(self.root, "tune")

    @property
    def best(self) -> str:
        return storage.join(self.root, "best")


def _settings(obj: Any) -> Any:
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj


def prepare_base(config: Config, sweep_uri: str, executor, log=print) -> dict[str, Any]:
    """The data, the initial model and one attribution per rule in sweep.rules, each once.

    The same stages, settings and manifests as `raypipe run`'s, so a rerun skips what is done and a
    changed setting recomputes only what depends on it. Returns {"data": summary, "attribution":
    {rule: manifest}, "ran": [stages computed now]}.
    """
    cfg = config
    lay = Layout(sweep_uri)
    storage.makedirs(sweep_uri)
    storage.write_bytes(storage.join(sweep_uri, "config.yaml"), dump_config(cfg).encode())
    p = Pipeline(cfg, lay.base, executor, log=log)
    # The same data and initial stages (settings, fingerprints, bodies) as `raypipe run`'s.
    data, _ = data_and_initial(p, executor, log)
    ran = [f"base/{s}" for s in p.ran]

    attributions = {}
    for rule in cfg.sweep.rules:
        pr = Pipeline(cfg, lay.rule_root(rule), executor, log=log)
        pr.manifests.update({k: p.manifests[k] for k in ("data", "initial")})
        attributions[rule] = attribution_stage(pr, rule, lay.data, data, lay.initial_model, executor, log)
        ran += [f"base/{rule}/{s}" for s in pr.ran]
    return {"data": data, "initial": p.manifests["initial"], "attribution": attributions, "ran": ran}


# ---------------------------------------------------------------------------------------------
# The validation set (the objective).


def read_trusted(path: str, config: Config, sample_shape: tuple[int, ...], num_classes: int) -> SampleSet:
    """The user's clean labelled set (sweep.trusted_path) as a SampleSet shaped like the data."""
    import pyarrow.dataset as pads

    from raypipe.data.parquet_source import read_parquet_source

    where = f"config key 'sweep.trusted_path': '{path}'"
    if not storage.exists(path):
        raise ConfigError(f"{where} does not exist; point it at a Parquet file or directory of clean samples")
    fs, inner = storage.resolve(path)
    try:
        names = pads.dataset(inner, filesystem=fs, format="parquet").schema.names
    except Exception as e:  # pyarrow raises several types for unreadable data
        raise DataError(f"{where} is not readable Parquet: {str(e).splitlines()[0]}") from None
    image = config.data.image_column if config.data.image_column in names else "x"  # raypipe's own tables: x
    data_cfg = dataclasses.replace(
        config.data, source="parquet", path=path, image_column=image, shape=None, num_classes=num_classes
    )
    try:
        samples, _ = read_parquet_source(data_cfg)
    except RaypipeError as e:
        raise DataError(f"{where}: {e}") from None
    width = int(np.prod(sample_shape))
    if samples.x.reshape(len(samples), -1).shape[1] != width:
        raise DataError(
            f"{where}: each sample has {samples.x.reshape(len(samples), -1).shape[1]} values, the data's samples "
            f"{width} (shape {list(sample_shape)})"
        )
    if samples.label.min() < 0 or samples.label.max() >= num_classes:
        raise DataError(
            f"{where}: labels must be in [0, {num_classes}); found {samples.label.min()}..{samples.label.max()}"
        )
    x = samples.x.reshape(len(samples), *sample_shape)
    return SampleSet.clean(samples.sample_id, x, samples.label, num_classes)


def validation_set(config: Config, sweep_uri: str) -> SampleSet:
    lay = Layout(sweep_uri)
    if config.sweep.objective == "trusted":
        data = storage.read_manifest(lay.data)["summary"]
        return read_trusted(config.sweep.trusted_path, config, tuple(data["sample_shape"]), data["num_classes"])
    val = prepare.read_split(lay.data, "val")
    if len(val) == 0:
        raise ConfigError(
            "config key 'data.val_fraction': sweep.objective=noisy needs a validation split held out from the "
            "training data; set data.val_fraction > 0 (e.g. 0.1) or use sweep.objective=trusted"
        )
    return val


# ---------------------------------------------------------------------------------------------
# One trial.


def finetune_request(config: Config, sweep_uri: str, trial_id: str, spec: TrialSpec, device: str) -> TrainRequest:
    lay = Layout(sweep_uri)
    tcfg = trial_config(config, spec)
    trial_uri = lay.trial(trial_id)
    return TrainRequest(
        spec.route,
        tcfg.section(spec.route),
        lay.data,
        trial_uri,
        tcfg.model,
        tcfg.run.seed,
        storage.join(trial_uri, "partition"),
        storage.join(trial_uri, "prune", "model.pt"),
        device,
    )


def prepare_trial(config: Config, sweep_uri: str, trial_id: str, spec: TrialSpec, log=print) -> dict[str, Any]:
    """The trial's partition (tau) and pruning (prune fraction) from its rule's shared attributions,
    under the trial's directory; skipped when a restarted trial finds them done."""
    lay = Layout(sweep_uri)
    tcfg = trial_config(config, spec)
    executor = LocalExecutor(log)
    p = Pipeline(tcfg, lay.trial(trial_id), executor, log=log)
    for stage, uri in (
        ("data", lay.data),
        ("initial", storage.join(lay.base, "initial")),
        ("attribution", lay.attribution(spec.rule)),
    ):
        manifest = storage.read_manifest(uri)
        if manifest is None:
            raise RaypipeError(f"the sweep's shared stage '{uri}' is not finished; rerun the sweep")
        p.manifests[stage] = manifest
    n_rows = p.manifests["data"]["summary"]["rows"]["train"]
    attribution_uri = lay.attribution(spec.rule)
    n_classes = p.manifests["data"]["summary"]["num_classes"]
    part = p.stage(
        "partition",
        {"partition": _settings(tcfg.partition), "detection": _settings(tcfg.detection), "seed": tcfg.run.seed},
        ["attribution"],
        lambda uri: partition.run(
            attribution_uri,
            uri,
            tcfg.partition,
            tcfg.detection,
            tcfg.run.seed,
            n_rows,
            n_classes,
            storage.join(lay.base, "initial", "trajectory"),
            executor,
            log,
        ),
    )
    pruned = p.stage(
        "prune",
        _settings(tcfg.prune),
        ["initial", "attribution", "partition"],
        lambda uri: prune.run(lay.initial_model, attribution_uri, p.uri("partition"), uri, tcfg.prune, executor, log),
    )
    return {"partition": part["summary"], "prune": pruned["summary"]}


def read_finetune(trial_uri: str) -> tuple[torch.nn.Module, dict[str, Any], dict[str, Any]] | None:
    """(model, signature, extra) of the trial's last finished epoch, or None before its first."""
    uri = storage.join(trial_uri, FINETUNE_FILE)
    return load_model(uri) if storage.exists(uri) else None


def finetune_history(trial_uri: str) -> list[dict[str, Any]]:
    found = read_finetune(trial_uri)
    return list(found[2].get("history", [])) if found else []


def epoch_batches(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1
):
    """This rank's batches of one epoch: a permutation seeded by (seed, epoch), padded by wrapping to a
    multiple of `world` and strided by rank, so every rank runs the same number of batches (DDP)."""
    n = len(y)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    if world > 1:
        total = -(-n // world) * world
        order = order.repeat(-(-total // max(n, 1)))[:total][rank::world]
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        yield x[index], y[index]


class FineTune:
    """Fine-tuning of one trial, epoch by epoch, evaluated on the validation set after each epoch.

    Starts from the trial's pruned model, or from ``finetune.pt`` (the last finished epoch, with its
    optimizer state) when the trial ran before. `wrap` turns the model into its data-parallel form
    (Ray Train's prepare_model) on a worker; rank 0 writes ``finetune.pt``.
    """

    def __init__(
        self,
        request: TrainRequest,
        val: SampleSet,
        device: str | torch.device = "cpu",
        rank: int = 0,
        world: int = 1,
        wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
    ):
        self.request, self.val, self.rank, self.world = request, val, rank, world
        self.device = resolve_device(device) if isinstance(device, str) else device
        train = training_samples(request)
        self.n_train = len(train)
        self.x = torch.tensor(train.x, dtype=torch.float32)
        self.y = torch.tensor(train.label, dtype=torch.long)
        found = read_finetune(request.out_uri)
        if found is None:
            model, self.signature = starting_model(request, train.sample_shape, train.num_classes)
            self.history: list[dict[str, Any]] = []
            optimizer_state = None
        else:
            model, self.signature, extra = found
            self.history = list(extra["history"])
            optimizer_state = extra["optimizer_state"]
        params = trainable_parameters(model, request.route)
        model.to(self.device)
        self.model = wrap(model) if wrap is not None else model
        self.optimizer = make_optimizer(params, request.train)
        if optimizer_state is not None:
            self.optimizer.load_state_dict(optimizer_state)

    @property
    def bare_model(self) -> torch.nn.Module:
        return getattr(self.model, "module", self.model)

    def run(self, report: Callable[[dict[str, Any]], None]) -> list[dict[str, Any]]:
        """Train the remaining epochs; after each: evaluate, save (rank 0), then `report(metrics)`."""
        cfg = self.request.train
        for epoch in range(len(self.history), cfg.epochs):
            start = time.perf_counter()
            batches = epoch_batches(self.x, self.y, cfg.batch_size, self.request.seed, epoch, self.rank, self.world)
            train_metrics = train_epoch(self.model, batches, self.optimizer, self.request.route, self.device)
            seconds = time.perf_counter() - start
            val = evaluate(self.bare_model, self.val.x, self.val.label, self.device)
            metrics = {
                "epoch": epoch + 1,
                METRIC: val["accuracy"],
                "val_macro_f1": val["macro_f1"],
                "train_loss": train_metrics["train_loss"],
                "train_accuracy": train_metrics["train_accuracy"],
                "n_clean": self.n_train,
                "seconds_epoch": seconds,
            }
            self.history.append(metrics)
            if self.rank == 0:  # saved before it is reported: the objective Tune sees always has its model
                extra = {"history": self.history, "optimizer_state": self.optimizer.state_dict()}
                blob = checkpoint_dict(self.bare_model, self.signature, extra)  # tensors copied to CPU
                storage.save_torch(storage.join(self.request.out_uri, FINETUNE_FILE), blob)
            report(metrics)
        return self.history


def _append_event(trial_uri: str, event: dict[str, Any]) -> None:
    uri = storage.join(trial_uri, "events.jsonl")
    before = storage.read_bytes(uri) if storage.exists(uri) else b""
    storage.write_bytes(uri, before + (json.dumps(event) + "\n").encode())


def run_trial(
    config: Config,
    sweep_uri: str,
    trial_id: str,
    spec: TrialSpec,
    report: Callable[[dict[str, Any]], None],
    device: str = "cpu",
    log=print,
    train_remote: Callable[[TrainRequest], None] | None = None,
) -> dict[str, Any]:
    """One trial: partition, prune, fine-tune, with `report(metrics)` after every epoch.

    A trial that ran before replays its finished epochs to `report` and continues after them (a
    finished one trains nothing). `train_remote(request)`, when given, runs the remaining epochs
    elsewhere (Ray Train workers) instead of in this process, and reports each of them. A setting
    that cannot work (e.g. a tau that leaves no clean samples) ends the trial as infeasible: one
    report with a NaN objective, and the reason in ``infeasible.json``.
    """
    trial_uri = Layout(sweep_uri).trial(trial_id)
    history = finetune_history(trial_uri)
    _append_event(trial_uri, {"event": "start", "trial_id": trial_id, "epochs_done": len(history), "time": time.time()})
    storage.write_json(storage.join(trial_uri, "spec.json"), spec.to_dict())
    try:
        prepared = prepare_trial(config, sweep_uri, trial_id, spec, log)
    except RaypipeError as e:
        storage.write_json(storage.join(trial_uri, "infeasible.json"), {"message": str(e)})
        log(f"[trial {trial_id}] infeasible: {e}")
        report({"epoch": 0, METRIC: float("nan"), "infeasible": 1})
        return {"infeasible": str(e)}
    for metrics in history:  # replay: Tune (and ASHA) see the whole history again, nothing is retrained
        report(metrics)
    request = finetune_request(config, sweep_uri, trial_id, spec, device)
    if len(history) < spec.epochs:
        if train_remote is not None:
            train_remote(request)
        else:
            FineTune(request, validation_set(config, sweep_uri), device).run(report)
    history = finetune_history(trial_uri)
    result = {"trial_id": trial_id, "spec": spec.to_dict(), **prepared, "history": history}
    storage.write_json(storage.join(trial_uri, "result.json"), result)
    return result


# ---------------------------------------------------------------------------------------------
# Outputs.


def trial_row(sweep_uri: str, trial_id: str, spec: TrialSpec, error: str | None) -> dict[str, Any]:
    """A trial's line in trials.csv, from what its directory holds (the model its objective belongs to)."""
    trial_uri = Layout(sweep_uri).trial(trial_id)
    history = finetune_history(trial_uri)
    last = history[-1] if history else {}
    infeasible_uri = storage.join(trial_uri, "infeasible.json")
    if error:
        status, message = "error", error.strip().splitlines()[-1][:300] if error.strip() else "error"
    elif storage.exists(infeasible_uri):
        status, message = "infeasible", storage.read_json(infeasible_uri)["message"]
    elif not history:
        status, message = "error", f"no finished epoch in '{trial_uri}'"
    elif len(history) < spec.epochs:
        status, message = "stopped_early", f"stopped by ASHA after {len(history)} of {spec.epochs} epochs"
    else:
        status, message = "completed", ""
    return {
        "trial_id": trial_id,
        **spec.to_dict(),
        "epochs_run": len(history),
        METRIC: float(last.get(METRIC, float("nan"))),
        "val_macro_f1": float(last.get("val_macro_f1", float("nan"))),
        "n_clean": int(last["n_clean"]) if "n_clean" in last else -1,
        "status": status,
        "message": message,
    }


def choose_best(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The trial with the highest objective (after its last epoch); ties go to the earlier trial."""
    scored = [r for r in rows if r["status"] != "error" and math.isfinite(r[METRIC])]
    if not scored:
        return None
    return max(scored, key=lambda r: r[METRIC])  # max keeps the first of equal values


def write_table(sweep_uri: str, rows: list[dict[str, Any]]) -> None:
    import pyarrow as pa

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(TABLE_COLUMNS), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row[k] for k in TABLE_COLUMNS})
    storage.write_bytes(storage.join(sweep_uri, "trials.csv"), buf.getvalue().encode())
    table = pa.table({k: [row[k] for row in rows] for k in TABLE_COLUMNS})
    storage.write_table(storage.join(sweep_uri, "trials.parquet"), table)


def read_table(sweep_uri: str) -> list[dict[str, Any]]:
    """trials.csv back as rows with their types."""
    text = storage.read_bytes(storage.join(sweep_uri, "trials.csv")).decode()
    types = {"lr": float, "epochs": int, "tau": float, "prune_fraction": float, "epochs_run": int}
    types.update({METRIC: float, "val_macro_f1": float, "n_clean": int})
    return [{k: types.get(k, str)(v) for k, v in row.items()} for row in csv.DictReader(io.StringIO(text))]


def write_best(config: Config, sweep_uri: str, best: dict[str, Any], rows: list[dict[str, Any]], log=print):
    """best/config.yaml, best/model.pt and best/report.json (metrics on the clean test split)."""
    lay = Layout(sweep_uri)
    spec = TrialSpec.from_dict(best)
    model, signature, _ = read_finetune(lay.trial(best["trial_id"]))
    extra = {"sweep_trial": best["trial_id"], "hyperparameters": spec.to_dict(), METRIC: best[METRIC]}
    save_model(storage.join(lay.best, "model.pt"), model, signature, extra)
    storage.write_bytes(storage.join(lay.best, "config.yaml"), dump_config(trial_config(config, spec)).encode())

    cpu = resolve_device("cpu")
    test = prepare.read_split(lay.data, "test")
    val = validation_set(config, sweep_uri)
    initial, _, _ = load_model(lay.initial_model)
    manifest = storage.read_manifest(storage.join(lay.trial(best["trial_id"]), "partition"))
    report = {
        "trial_id": best["trial_id"],
        "hyperparameters": spec.to_dict(),
        "objective": {
            "metric": METRIC,
            "mode": config.sweep.objective,
            "value": best[METRIC],
            "n_val": len(val),
            "epochs_run": best["epochs_run"],
        },
        # The clean test split: reported here for the chosen trial only; never used to choose it.
        "test": evaluate(model, test.x, test.label, cpu),
        "initial": {
            "test": evaluate(initial, test.x, test.label, cpu),
            METRIC: evaluate(initial, val.x, val.label, cpu)["accuracy"],
        },
        "partition": manifest["summary"] if manifest else None,
        "trials": {
            "n": len(rows),
            **{s: sum(r["status"] == s for r in rows) for s in ("completed", "stopped_early", "infeasible", "error")},
        },
    }
    storage.write_json(storage.join(lay.best, "report.json"), report)
    log(
        f"[sweep] best trial {best['trial_id']}: {spec.to_dict()}; {METRIC} ({config.sweep.objective}) "
        f"{best[METRIC]:.4f}, test accuracy {report['test']['accuracy']:.4f} "
        f"(initial {report['initial']['test']['accuracy']:.4f})"
    )
    return report


RULE_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:purple")
ROUTE_MARKERS = {"l_ft": "o", "f_ft": "s"}


def objective_figure(rows: list[dict[str, Any]], objective: str):
    """Objective against tau, prune fraction and lr; color = rule, marker = route, hollow = stopped early."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4), dpi=110, layout="constrained")
    axes = fig.subplots(1, 3, sharey=True)
    rules = sorted({r["rule"] for r in rows})
    shown = [r for r in rows if math.isfinite(r[METRIC])]
    rng = np.random.default_rng(0)  # a little jitter, so trials at the same setting stay visible
    for ax, key, title in zip(
        axes, ("tau", "prune_fraction", "lr"), ("tau", "prune fraction", "learning rate"), strict=True
    ):
        values = np.array([r[key] for r in shown], dtype=float)
        several = len(np.unique(values)) > 1
        span = float(np.ptp(np.log10(values) if key == "lr" else values)) if several else 0.0
        for r in shown:
            color = RULE_COLORS[rules.index(r["rule"]) % len(RULE_COLORS)]
            shift = 0.015 * span * rng.standard_normal()
            x = r[key] * 10**shift if key == "lr" else r[key] + shift
            hollow = r["status"] == "stopped_early"
            ax.scatter(
                x,
                r[METRIC],
                marker=ROUTE_MARKERS.get(r["route"], "o"),
                facecolors="none" if hollow else color,
                edgecolors=color,
                s=40,
            )
        if key == "lr":
            ax.set_xscale("log")
        ax.set_xlabel(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"validation accuracy ({objective} labels)")
    from matplotlib.lines import Line2D

    handles = [
        Line2D([], [], ls="", marker="o", color=RULE_COLORS[i % len(RULE_COLORS)], label=f"rule {rule}")
        for i, rule in enumerate(rules)
    ]
    handles += [Line2D([], [], ls="", marker=m, color="gray", label=route) for route, m in ROUTE_MARKERS.items()]
    handles += [Line2D([], [], ls="", marker="o", markerfacecolor="none", color="gray", label="stopped early")]
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=9)
    fig.suptitle(f"raypipe sweep: {len(rows)} trials, objective after each trial's last epoch")
    return fig


def write_plot(sweep_uri: str, rows: list[dict[str, Any]], objective: str, log=print) -> str | None:
    uri = storage.join(sweep_uri, "plots", "objective.png")
    try:
        fig = objective_figure(rows, objective)
        buf = io.BytesIO()
        try:
            fig.savefig(buf, format="png")
        finally:
            fig.clear()
        storage.write_bytes(uri, buf.getvalue())
        return uri
    except Exception as e:  # a plot is never worth failing a sweep for
        log(f"[sweep] warning: plots/objective.png not written: {type(e).__name__}: {str(e)[:200]}")
        return None


def write_outputs(
    config: Config, sweep_uri: str, trials: list[tuple[str, TrialSpec, str | None]], log=print
) -> dict[str, Any]:
    """trials.csv / .parquet, best/ and plots/ from (trial_id, spec, error or None) of every trial."""
    rows = [trial_row(sweep_uri, trial_id, spec, error) for trial_id, spec, error in trials]
    write_table(sweep_uri, rows)
    best = choose_best(rows)
    report = write_best(config, sweep_uri, best, rows, log) if best else None
    if best is None:
        log("[sweep] no trial produced an objective; see trials.csv")
    write_plot(sweep_uri, rows, config.sweep.objective, log)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("completed", "stopped_early", "infeasible", "error")}
    log(f"[sweep] {len(rows)} trials: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    return {"rows": rows, "best": best, "report": report, "counts": counts}
