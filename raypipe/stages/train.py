"""Stages `initial`, `retrain`, `l_ft`, `f_ft`: one training request, run by an executor.

A request names everything by URI (data, partition, starting checkpoint, output), so the same
request runs in this process (`train_local`) or on Ray Train workers. Output under
``<run>/<route>/``: ``model.pt`` and the metrics on the clean test split.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from raypipe import storage
from raypipe.config import ModelConfig, TrainConfig
from raypipe.core.detection import TrajectoryRecorder
from raypipe.core.models import build_model, load_model, save_model
from raypipe.data import SampleSet
from raypipe.stages.data import read_split
from raypipe.stages.partition import read_partition
from raypipe.tables import columns_from_table, table_from_columns
from raypipe.training.loop import FRESH_ROUTES, evaluate, fit, predict_logits, resolve_device


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
    # `early_loss_epoch`) for raypipe.detection: an eval pass over the training set after each.
    trajectory_epochs: int = 0
    early_loss_epoch: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def clean_ids(partition_uri: str) -> np.ndarray:
    """Sorted sample ids of the clean part."""
    cols = columns_from_table(read_partition(partition_uri, ["sample_id", "is_clean"]))
    return np.sort(cols["sample_id"][cols["is_clean"].astype(bool)])


def training_samples(request: TrainRequest) -> SampleSet:
    train = read_split(request.data_uri, "train")
    if request.route == "initial":
        return train
    keep = np.isin(train.sample_id, clean_ids(request.partition_uri))
    return train.subset(keep)


def starting_model(request: TrainRequest, sample_shape, num_classes):
    """-> (model, signature): fresh for initial / retrain, else the checkpoint to repair."""
    from raypipe.core.models import model_signature

    if request.route in FRESH_ROUTES:
        import torch

        torch.manual_seed(request.seed)
        model = build_model(request.model, sample_shape, num_classes)
        return model, model_signature(request.model, sample_shape, num_classes)
    model, signature, _ = load_model(request.init_model_uri)
    return model, signature


def make_recorder(request: TrainRequest, sample_ids: np.ndarray) -> TrajectoryRecorder | None:
    if request.trajectory_epochs <= 0:
        return None
    return TrajectoryRecorder(sample_ids=sample_ids, keep_loss_epochs=[request.early_loss_epoch])


def write_trajectory(out_uri: str, recorder: TrajectoryRecorder, early_loss_epoch: int, part: int = 0) -> None:
    """``<route>/trajectory/rank-NNN.parquet``: sample_id, aum, early_loss (NaN if that epoch was not run)."""
    early = (
        recorder.early_loss(early_loss_epoch)
        if early_loss_epoch in recorder.losses
        else np.full(recorder.num_samples, np.nan, dtype=np.float32)
    )
    columns = {"sample_id": recorder.sample_ids, "aum": recorder.aum(), "early_loss": early}
    storage.write_table(storage.join(out_uri, "trajectory", f"rank-{part:03d}.parquet"), table_from_columns(columns))


def train_local(request: TrainRequest, log=print) -> dict[str, Any]:
    device = resolve_device(request.device)
    train = training_samples(request)
    test = read_split(request.data_uri, "test")
    model, signature = starting_model(request, train.sample_shape, train.num_classes)
    n_epochs = request.train.epochs
    recorder = make_recorder(request, train.sample_id)

    def on_epoch(epoch: int, _model, metrics: dict[str, float]) -> None:
        if recorder is not None and epoch <= request.trajectory_epochs:
            logits = predict_logits(model, train.x, 1024, device)  # [N, C], end-of-epoch eval pass
            recorder.update(train.sample_id, logits, train.label, epoch)
        if epoch == n_epochs or epoch % max(1, n_epochs // 5) == 0:
            log(
                f"[{request.route}] epoch {epoch}/{n_epochs} loss {metrics['train_loss']:.4f} "
                f"train acc {metrics['train_accuracy']:.3f} ({metrics['seconds']:.2f} s)"
            )

    start = time.perf_counter()
    result = fit(model, train.x, train.label, request.train, request.route, device, request.seed, on_epoch)
    metrics = evaluate(model, test.x, test.label, device)
    save_model(storage.join(request.out_uri, "model.pt"), model, signature)
    if recorder is not None:
        write_trajectory(request.out_uri, recorder, request.early_loss_epoch)
    return {
        **metrics,
        "seconds_per_epoch": result.seconds_per_epoch,
        "seconds_train": result.seconds_total,
        "seconds_total": time.perf_counter() - start,
        "epochs": result.epochs,
        "n_train": len(train),
        "train_accuracy_given_labels": result.history[-1]["train_accuracy"] if result.history else float("nan"),
    }
