"""What differs between the callers of the one training loop, as callbacks (`raypipe.training.loop.Callback`):
scoring a validation set each epoch, recording the training trajectory, progress lines. (Saving the
resumable checkpoint is `raypipe.training.checkpoint.SaveCheckpoint`; reporting to Ray Train or Tune
lives with those wrappers in `raypipe.distributed`.)"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from raypipe.core.detection.trajectory import TrajectoryRecorder
from raypipe.errors import TrainingDiverged
from raypipe.training.loop import Callback, EpochData, LoopState, evaluate, predict_logits, unwrap

# Samples per batch of the end-of-epoch eval pass. Measured on 2 CPUs, one thread: cnn_small predicted 8192
# samples in 1.84 s in batches of 256, 2.59 s in batches of 1024 (the larger activations leave the cache).
EVAL_BATCH_SIZE = 256

# A callable that returns every data-parallel rank's object, in rank order (the identity's [obj] in one process).
Gather = Callable[[Any], list[Any]]


class StopOnNonFinite(Callback):
    """Stops the loop when an epoch's training loss is NaN or infinite: the weights diverged, and every later
    epoch, checkpoint and score would be garbage. `hint` says which setting to change. With data-parallel
    ranks, `gather` lets every rank see every rank's loss, so all stop at the same epoch. Keep it first, so
    that no other callback (the checkpoint above all) sees a diverged epoch."""

    name = "finite"

    def __init__(self, route: str, hint: str, gather: Gather | None = None):
        self.route, self.hint, self.gather = route, hint, gather

    def on_epoch_end(self, epoch: int, metrics: dict[str, Any], state: LoopState) -> None:
        loss = float(metrics["train_loss"])
        losses = self.gather(loss) if self.gather is not None else [loss]
        bad = [value for value in losses if not math.isfinite(value)]
        if bad:
            raise TrainingDiverged(
                f"route '{self.route}': the training loss is {bad[0]} after epoch {epoch} (the weights diverged); "
                f"{self.hint}"
            )


class Validate(Callback):
    """Scores a labelled set after every epoch: adds `val_accuracy` and `val_macro_f1` to the metrics."""

    name = "validate"

    def __init__(self, model: torch.nn.Module, x: np.ndarray, y: np.ndarray, device: torch.device):
        self.model, self.x, self.y, self.device = model, x, y, device

    def on_epoch_end(self, epoch: int, metrics: dict[str, Any], state: LoopState) -> None:
        scores = evaluate(unwrap(self.model), self.x, self.y, self.device)
        metrics.update(val_accuracy=scores["accuracy"], val_macro_f1=scores["macro_f1"])


class Log(Callback):
    """Progress lines: about five per route, and the last epoch."""

    name = "log"

    def __init__(self, route: str, epochs: int, log: Callable[[str], None]):
        self.route, self.epochs, self.log = route, epochs, log

    def on_epoch_end(self, epoch: int, metrics: dict[str, Any], state: LoopState) -> None:
        if epoch == self.epochs or epoch % max(1, self.epochs // 5) == 0:
            val = f", val acc {metrics['val_accuracy']:.3f}" if "val_accuracy" in metrics else ""
            self.log(
                f"[{self.route}] epoch {epoch}/{self.epochs} loss {metrics['train_loss']:.4f} "
                f"train acc {metrics['train_accuracy']:.3f}{val} ({metrics['seconds']:.2f} s)"
            )


class RecordTrajectory(Callback):
    """Per-sample margin, loss and wrong events of the first `epochs` epochs, from an eval pass over the samples
    this rank holds at the end of each (detection signals: AUM, the loss at `early_loss_epoch`, wrong events).

    Each rank records what it holds; `gather` collects every rank's recorder, and their merge is what
    the checkpoint keeps. Restored from a checkpoint, the merged state goes to the writer rank only
    (`keeps_restored`), so the next merge counts it once.
    """

    name = "trajectory"

    def __init__(
        self,
        model: torch.nn.Module,
        data: EpochData,
        sample_ids: np.ndarray,
        epochs: int,
        early_loss_epoch: int,
        device: torch.device,
        gather: Gather | None = None,
        keeps_restored: bool = True,
    ):
        self.model, self.data, self.epochs, self.device = model, data, epochs, device
        self.sample_ids, self.early_loss_epoch = np.asarray(sample_ids, dtype=np.int64), early_loss_epoch
        self.gather, self.keeps_restored = gather, keeps_restored
        self.recorder = self._new()
        self.merged: TrajectoryRecorder | None = None

    def _new(self) -> TrajectoryRecorder:
        return TrajectoryRecorder(sample_ids=self.sample_ids, keep_loss_epochs=[self.early_loss_epoch])

    def on_epoch_end(self, epoch: int, metrics: dict[str, Any], state: LoopState) -> None:
        if epoch > self.epochs:
            return
        held = self.data.held()
        if held is not None:
            ids, x, y = held
            # [n, C]: the end-of-epoch eval pass
            logits = predict_logits(unwrap(self.model), x, EVAL_BATCH_SIZE, self.device)
            self.recorder.update(ids, logits, np.asarray(y), epoch)
        self.merged = self._merge()

    def _merge(self) -> TrajectoryRecorder:
        if self.gather is None:
            return self.recorder
        merged = self._new()
        for state in self.gather(self.recorder.state_dict()):
            part = self._new()
            part.load_state_dict(state)
            merged.merge(part)
        return merged

    def state_dict(self) -> dict[str, Any]:
        return (self.merged or self.recorder).state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.keeps_restored:
            self.recorder.load_state_dict(state)

    def result(self) -> TrajectoryRecorder | None:
        """Every rank's recording merged (None when nothing was recorded)."""
        recorder = self.merged or self.recorder
        return recorder if int(recorder.count.sum()) > 0 else None


class Report(Callback):
    """Hands every epoch's metrics to a sink (Ray Train's or Tune's report, a relay to a Tune trial).
    Keep it after `SaveCheckpoint`: what is reported then always has its checkpoint on disk."""

    name = "report"

    def __init__(self, sink: Callable[[dict[str, Any]], None]):
        self.sink = sink

    def on_epoch_end(self, epoch: int, metrics: dict[str, Any], state: LoopState) -> None:
        self.sink(dict(metrics))


class TimeBudget(Callback):
    """Stops the loop once the next epoch would end past `budget_s` training seconds (at the mean epoch time so
    far): a route given a wall time rather than an epoch count. The first epoch always runs. With data-parallel
    ranks, `gather` makes every rank take rank 0's decision, so all stop at the same epoch."""

    name = "time_budget"

    def __init__(self, budget_s: float, gather: Gather | None = None):
        self.budget_s, self.gather = budget_s, gather

    def on_epoch_end(self, epoch: int, metrics: dict[str, Any], state: LoopState) -> None:
        stop = state.seconds_train + state.seconds_per_epoch > self.budget_s
        decisions = self.gather(stop) if self.gather is not None else [stop]
        if decisions[0]:
            state.stop = True
