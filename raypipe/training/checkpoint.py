"""One checkpoint format, for a finished model and for a training run in progress.

A checkpoint is ``{"signature", "model_state", "extra"}`` saved with torch.save and always loaded
with ``torch.load(weights_only=True)``: it holds tensors and plain containers and can never run
code. ``signature`` is the architecture that produced it (`raypipe.core.models.model_signature`);
a checkpoint of another architecture is refused before its weights are read.

- ``model.pt`` of a stage: the model; ``extra`` holds what its producer wants to say about it.
- ``checkpoint.pt`` of a training stage, written after every epoch: the model plus
  ``extra["training"]`` = the optimizer's state, the loop's state (epochs done, seconds, history)
  and each callback's state (the trajectory recorder's sums). Every caller of the loop resumes
  from it: this process, a restarted Ray Train worker group, a Tune trial resumed after a crash.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from raypipe import storage
from raypipe.config import ModelConfig
from raypipe.core.models import (
    ProbedModel,
    build_model,
    check_signature,
    checkpoint_dict,
    load_checkpoint_dict,
    saved_signature,
)
from raypipe.errors import CheckpointError, ConfigError, RaypipeError
from raypipe.training.loop import Callback, LoopState


def save_model(uri: str, model: ProbedModel, signature: dict[str, Any], extra: dict[str, Any] | None = None) -> None:
    storage.save_torch(uri, checkpoint_dict(model, signature, extra))


def load_model(uri: str, expect: dict[str, Any] | None = None) -> tuple[ProbedModel, dict[str, Any], dict[str, Any]]:
    """Rebuild the model a raypipe checkpoint describes -> (model, signature, extra).

    With `expect` (a signature from the config), a checkpoint of another architecture, probe width,
    input shape or class count is refused with a message saying which.
    """
    blob = storage.load_torch(uri)
    signature = saved_signature(blob, uri)
    if expect is not None:  # refuse before building: the config, not the checkpoint, picks the code that runs
        check_signature(signature, expect, uri)
    source = expect or signature
    cfg = ModelConfig(
        name=source["name"],
        probe_width=source["probe_width"],
        hidden_width=source["hidden_width"],
        factory=source.get("factory"),
    )
    try:
        model = build_model(cfg, tuple(source["input_shape"]), source["num_classes"])
    except (ConfigError, TypeError, ValueError) as e:
        if expect is not None:
            raise
        raise CheckpointError(f"checkpoint '{uri}' describes a model that cannot be built: {e}") from None
    extra = load_checkpoint_dict(blob, model, source, uri)
    return model, signature, extra


def read_training(uri: str) -> dict[str, Any] | None:
    """The training state of a run in progress (``extra["training"]`` of its checkpoint), or None."""
    if not storage.exists(uri):
        return None
    return load_model(uri)[2].get("training")


def restore(
    uri: str,
    model: ProbedModel,
    signature: dict[str, Any],
    optimizer: torch.optim.Optimizer,
    callbacks: list[Callback],
    log=print,
) -> LoopState:
    """Load a run in progress from `uri` into model, optimizer and callbacks -> its LoopState; a
    fresh LoopState when there is no checkpoint yet, or when the one there cannot be read (it is removed
    and the training starts again: a damaged resume point is never trained on)."""
    if not storage.exists(uri):
        return LoopState()
    try:
        extra = load_checkpoint_dict(storage.load_torch(uri), model, signature, uri)
    except RaypipeError as e:
        log(f"[training] {e}: removed, training from the first epoch")
        with contextlib.suppress(OSError):  # every data-parallel rank finds it damaged; one removes it
            storage.remove_tree(uri)
        return LoopState()
    training = extra["training"]
    optimizer.load_state_dict(training["optimizer_state"])
    for callback in callbacks:
        state = training["callbacks"].get(callback.name)
        if state is not None:
            callback.load_state_dict(state)
    return LoopState(training["epoch"], training["seconds_train"], list(training["history"]))


class SaveModelAt(Callback):
    """Publishes the model as it is at the end of `epoch` (1-based) to `uri` (the writer rank only): a snapshot
    of the run in progress, e.g. the initial model before it fit its wrong labels (a detection signal's
    representation). Keep it before `SaveCheckpoint`, so a run resumed after `epoch` finds the snapshot on disk."""

    name = "save_model_at"

    def __init__(self, uri: str, epoch: int, model: torch.nn.Module, signature: dict[str, Any], writer: bool = True):
        self.uri, self.epoch, self.model, self.signature, self.writer = uri, epoch, model, signature, writer

    def on_epoch_end(self, epoch: int, metrics: dict[str, Any], state: LoopState) -> None:
        if epoch == self.epoch and self.writer:
            save_model(self.uri, getattr(self.model, "module", self.model), self.signature, {"epoch": epoch})


class SaveCheckpoint(Callback):
    """Writes ``checkpoint.pt`` after every epoch (the writer rank only; every rank gathers the
    callbacks' states, which may be collective operations) but `final_epoch`, after which the caller
    publishes the model at once (a checkpoint then would only be written and deleted: on object
    storage, an upload for nothing). Keep it after the callbacks that add metrics, so the saved
    history is complete."""

    name = "checkpoint"

    def __init__(
        self,
        uri: str,
        model: torch.nn.Module,
        signature: dict[str, Any],
        optimizer: torch.optim.Optimizer,
        callbacks: list[Callback],
        writer: bool = True,
        final_epoch: int | None = None,
    ):
        self.uri, self.model, self.signature, self.optimizer = uri, model, signature, optimizer
        self.callbacks, self.writer, self.final_epoch = callbacks, writer, final_epoch

    def on_epoch_end(self, epoch: int, metrics: dict[str, Any], state: LoopState) -> None:
        if epoch == self.final_epoch:
            return
        states = {c.name: s for c in self.callbacks if (s := c.state_dict()) is not None}
        if not self.writer:
            return
        training = {
            "epoch": state.epoch,
            "seconds_train": state.seconds_train,
            "history": state.history,
            "optimizer_state": self.optimizer.state_dict(),
            "callbacks": states,
        }
        save_model(self.uri, getattr(self.model, "module", self.model), self.signature, {"training": training})
