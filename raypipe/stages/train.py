"""Stages `initial`, `retrain`, `l_ft`, `f_ft`, `relabel`: one training request, the same body wherever it runs.

A `TrainRequest` names everything by URI (data, partition, starting checkpoint, output), so the same
request runs in this process (`train_local`), in a Ray task, on Ray Train workers or inside a Tune
trial; `route_data` is what every one of them trains on (the same samples, order and global batch on
1 or n data-parallel copies) and `train_route` the body all of them run: build or load the model,
resume from the stage's ``checkpoint.pt``, run the one training loop with the callbacks the request
asks for, publish ``model.pt`` (and the training trajectory of the initial model). Output layout:
`raypipe.layout`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from raypipe import layout, storage
from raypipe.config import ModelConfig, TrainConfig
from raypipe.core.models import build_model, model_signature
from raypipe.data import SampleSet, samples_from_table
from raypipe.stages.attribution import read_features
from raypipe.stages.data import read_split, train_format, train_sample_ids
from raypipe.stages.partition import read_partition
from raypipe.tables import columns_from_table, table_from_columns
from raypipe.training.callbacks import Gather, Log, RecordTrajectory, Report, StopOnNonFinite, TimeBudget, Validate
from raypipe.training.checkpoint import SaveCheckpoint, SaveModelAt, load_model, restore, save_model
from raypipe.training.loop import (
    FEATURE_CACHE_MAX_BYTES,
    CachedFeatures,
    Callback,
    EpochData,
    InMemory,
    LoopState,
    evaluate,
    fit,
    per_rank_batch,
    prepare,
    resolve_device,
)

FRESH_ROUTES = ("initial", "retrain")  # start from a new model; the others from the pruned one


@dataclass(frozen=True)
class TrainRequest:
    route: str
    train: TrainConfig
    data_uri: str
    out_uri: str
    model: ModelConfig
    seed: int
    # The clean / noisy split (every route but `initial` trains on the clean part only).
    partition_uri: str | None = None
    # Starting checkpoint (the pruned model for l_ft / f_ft); fresh routes build a new model.
    init_model_uri: str | None = None
    device: str = "auto"
    # Record per-sample margins for the first `trajectory_epochs` epochs (and the loss at the end of
    # `early_loss_epoch`) for detection: an eval pass over the training set after each.
    trajectory_epochs: int = 0
    early_loss_epoch: int = 0
    # Publish the model as it is after this epoch (1-based; 0 = never) as ``early_model.pt``: a representation
    # not yet fit to the wrong labels, for detection.
    early_model_epoch: int = 0
    # A labelled set (raypipe's sample-table Parquet) scored after every epoch (a sweep trial's objective).
    val_uri: str | None = None
    # l_ft: the attribution stage, whose kept backbone features the head trains on (when it kept them).
    attribution_uri: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainRequest:
        return cls(**{**d, "train": TrainConfig(**d["train"]), "model": ModelConfig(**d["model"])})


def clean_ids(partition_uri: str) -> np.ndarray:
    """Sorted sample ids of the clean part."""
    cols = columns_from_table(read_partition(partition_uri, ["sample_id", "is_clean"]))
    return np.sort(cols["sample_id"][cols["is_clean"].astype(bool)])


def relabelled_rows(partition_uri: str) -> tuple[np.ndarray, np.ndarray]:
    """(sample ids, new labels) of the flagged samples the partition relabelled (the relabel route's extra rows)."""
    cols = columns_from_table(read_partition(partition_uri, ["sample_id", "relabelled_to"]))
    if "relabelled_to" not in cols:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    take = cols["relabelled_to"] >= 0
    return cols["sample_id"][take], cols["relabelled_to"][take]


def training_samples(request: TrainRequest) -> SampleSet:
    train = read_split(request.data_uri, "train")
    if request.route == "initial":
        return train
    keep = np.isin(train.sample_id, clean_ids(request.partition_uri))
    if request.route != "relabel":
        return train.subset(keep)
    ids, new_labels = relabelled_rows(request.partition_uri)  # the clean part plus the confidently relabelled
    moved = np.isin(train.sample_id, ids)
    label = train.label.copy()
    order = np.argsort(ids)
    label[moved] = new_labels[order[np.searchsorted(ids, train.sample_id[moved], sorter=order)]]
    return dataclasses.replace(train, label=label).subset(keep | moved)


def route_data(request: TrainRequest, rank: int = 0, world: int = 1) -> tuple[EpochData, int]:
    """What `request` trains on as rank `rank` of `world` data-parallel copies -> (data, samples of the route).

    Every copy holds the route's samples and takes its rank's stride of each epoch's permutation, in
    batches of `per_rank_batch` (one process: the whole batch), so 1 or n copies see the same global
    batches. L-FT trains on the backbone features the attribution pass kept, when it kept them; else
    `prepare` computes them once from the samples.
    """
    batch, seed = per_rank_batch(request.train.batch_size, world), request.seed
    if request.route == "l_ft" and request.attribution_uri is not None:
        kept = read_features(request.attribution_uri, clean_ids(request.partition_uri), FEATURE_CACHE_MAX_BYTES)
        if kept is not None:
            features = InMemory.from_arrays(
                kept["features"], kept["label"], kept["sample_id"], batch, seed, rank=rank, world=world
            )
            return CachedFeatures.given(features), len(kept["sample_id"])
    train = training_samples(request)
    return InMemory.from_arrays(train.x, train.label, train.sample_id, batch, seed, rank=rank, world=world), len(train)


def route_size(request: TrainRequest) -> int:
    """How many samples `request` trains on (without reading them)."""
    if request.route == "initial":
        return len(train_sample_ids(request.data_uri))
    extra = len(relabelled_rows(request.partition_uri)[0]) if request.route == "relabel" else 0
    return len(clean_ids(request.partition_uri)) + extra


def starting_model(request: TrainRequest, sample_shape, num_classes):
    """-> (model, signature): fresh for initial / retrain (seeded), else the checkpoint to repair."""
    if request.route in FRESH_ROUTES:
        torch.manual_seed(request.seed)
        model = build_model(request.model, sample_shape, num_classes)
        return model, model_signature(request.model, sample_shape, num_classes)
    model, signature, _ = load_model(request.init_model_uri)
    return model, signature


def publish_given_model(model_cfg: ModelConfig, data_uri: str, sample_shape, num_classes: int, out_uri: str):
    """Stage `initial` with model.checkpoint given: checked against the data's shape and classes, published as the
    stage's model.pt -> its summary (accuracy on the test split)."""
    signature = model_signature(model_cfg, tuple(sample_shape), num_classes)
    model, _, extra = load_model(model_cfg.checkpoint, expect=signature)
    save_model(layout.model_file(out_uri), model, signature, extra)
    test = read_split(data_uri, "test")
    return {**evaluate(model, test.x, test.label, resolve_device("cpu")), "given": model_cfg.checkpoint}


def write_trajectory(out_uri: str, recorder, early_loss_epoch: int) -> None:
    """``trajectory/part-00000.parquet``: sample_id, aum, early_loss (NaN if that epoch was not run),
    wrong_events (in how many recorded epochs the prediction was not the given label), epochs_recorded."""
    early = (
        recorder.early_loss(early_loss_epoch)
        if early_loss_epoch in recorder.losses
        else np.full(recorder.num_samples, np.nan, dtype=np.float32)
    )
    columns = {
        "sample_id": recorder.sample_ids,
        "aum": recorder.aum(),
        "early_loss": early,
        "wrong_events": recorder.wrong_count,
        "epochs_recorded": recorder.count,
    }
    storage.write_table(layout.trajectory_file(out_uri), table_from_columns(columns))


@dataclass
class Worker:
    """Where one copy of the loop runs: its device, its rank among `world` data-parallel copies, how
    to wrap the model for them (DDP), how to gather an object from every rank, where metrics go."""

    device: torch.device
    rank: int = 0
    world: int = 1
    wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None
    gather: Gather | None = None
    report: Callable[[dict[str, Any]], None] | None = None
    log: Callable[[str], None] = field(default=print)


def train_route(request: TrainRequest, data: EpochData, sample_shape, num_classes: int, worker: Worker) -> LoopState:
    """The body of every training stage: model, resume, the loop with its callbacks, model.pt."""
    published = layout.model_file(request.out_uri)
    if storage.exists(published):  # trained to the end before; only the stage's record was cut off
        return finished_state(published)
    model, signature = starting_model(request, tuple(sample_shape), num_classes)
    trainee, optimizer, data = prepare(model, request.route, request.train, data, worker.device)
    hint = f"lower {request.route}.lr (now {request.train.lr:g})"
    callbacks: list[Callback] = [StopOnNonFinite(request.route, hint, worker.gather)]
    if request.trajectory_epochs > 0:
        ids = train_sample_ids(request.data_uri)
        trajectory = RecordTrajectory(
            model, data, ids, request.trajectory_epochs, request.early_loss_epoch, worker.device,
            worker.gather, keeps_restored=worker.rank == 0,
        )  # fmt: skip
        callbacks.append(trajectory)
    if request.train.time_budget_s is not None:
        callbacks.append(TimeBudget(request.train.time_budget_s, worker.gather))
    if request.val_uri is not None:
        val = samples_from_table(storage.read_table(request.val_uri))
        callbacks.append(Validate(model, val.x, val.label, worker.device))
    checkpoint = layout.checkpoint_file(request.out_uri)
    state = restore(checkpoint, model, signature, optimizer, callbacks, worker.log)
    if request.early_model_epoch > 0:
        early = layout.early_model_file(request.out_uri)
        callbacks.append(SaveModelAt(early, request.early_model_epoch, model, signature, worker.rank == 0))
    # After the last epoch model.pt is published at once: no checkpoint then, unless a report sink may stop
    # the run at that epoch's report, before model.pt (Tune ends a trial at its last report).
    final = request.train.epochs if worker.report is None else None
    callbacks.append(SaveCheckpoint(checkpoint, model, signature, optimizer, list(callbacks), worker.rank == 0, final))
    if worker.report is not None:
        callbacks.append(Report(worker.report))
    if worker.rank == 0:
        callbacks.append(Log(request.route, request.train.epochs, worker.log))
    trainee = worker.wrap(trainee) if worker.wrap is not None else trainee
    state = fit(trainee, optimizer, data, request.train.epochs, request.route, worker.device, state, callbacks)
    if worker.rank == 0:
        done = {"history": state.history, "epochs": state.epoch, "seconds_train": state.seconds_train}
        save_model(layout.model_file(request.out_uri), model, signature, done)
        recorded = trajectory.result() if request.trajectory_epochs > 0 else None
        if recorded is not None:
            write_trajectory(request.out_uri, recorded, request.early_loss_epoch)
        storage.remove_tree(checkpoint)  # model.pt is published: the resume point is no longer needed
    return state


def finished_state(model_uri: str) -> LoopState:
    """The loop's final state, as the published model.pt of a training stage records it."""
    done = load_model(model_uri)[2]
    return LoopState(done["epochs"], done["seconds_train"], list(done["history"]))


def route_summary(request: TrainRequest, n_train: int, started_at: float, **extra) -> dict[str, Any]:
    """What a training stage reports: the published model on the clean test split, its epochs and times
    (from ``model.pt``, which carries its training history wherever it was trained). `started_at`: the
    Unix time the route started; `seconds_total` and `wall_interval` ([start, end], Unix seconds) are
    its own wall time, whatever else ran beside it."""
    model, _, _ = load_model(layout.model_file(request.out_uri))
    state = finished_state(layout.model_file(request.out_uri))
    device = resolve_device(request.device)
    test = read_split(request.data_uri, "test")
    last = state.history[-1] if state.history else {}
    scores = evaluate(model.to(device), test.x, test.label, device)
    finished_at = time.time()
    return {
        **scores,
        "seconds_per_epoch": state.seconds_per_epoch,
        "seconds_train": state.seconds_train,
        "seconds_total": finished_at - started_at,
        "wall_interval": [started_at, finished_at],
        "epochs": state.epoch,
        "n_train": int(n_train),
        "train_accuracy_given_labels": float(last.get("train_accuracy", float("nan"))),
        "history": state.history,
        **extra,
    }


def train_local(request: TrainRequest, log=print, report: Callable[[dict[str, Any]], None] | None = None):
    """Run `request` in this process -> the stage summary."""
    started_at = time.time()
    data, n_train = route_data(request)
    train_route(
        request, data, *train_format(request.data_uri), Worker(resolve_device(request.device), report=report, log=log)
    )
    return route_summary(request, n_train, started_at)
