"""THE training loop of raypipe, and evaluation. Plain torch + scikit-learn metrics, no Ray, no files.

Every route (initial, l_ft, f_ft, retrain) in every place it runs (this process, a Ray Train worker,
a Tune trial) goes through `fit`. What differs between callers is a `Callback`, never a copy of the
loop: recording the training trajectory, scoring a validation set each epoch, saving the resumable
checkpoint, reporting to Ray Train or Tune, logging. `train_epoch` is the only place in raypipe that
steps an optimizer.

Routes: initial (a fresh model on all noisy samples: the model to repair), retrain (a fresh model on
the clean part: the baseline), l_ft (from the pruned model, on the clean part, the head only), f_ft
(from the pruned model, on the clean part, every layer).

Data order: epoch e visits a permutation of the samples seeded by (seed, e) alone, so a run resumed
at epoch e sees the same batches as an uninterrupted one; with `world` data-parallel ranks, rank r
takes every world-th sample of that permutation (padded by wrapping, so every rank runs the same
number of batches, which DDP needs) in batches of `per_rank_batch` samples: batch k of the ranks
together is batch k of the one-process run, and DDP's mean of their gradients is its gradient. So 1
or n workers train with the same global batch, learning rate and data order.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from raypipe.config import TrainConfig
from raypipe.core.metrics import classification_metrics
from raypipe.core.models import ProbedModel

Batch = tuple[torch.Tensor, torch.Tensor]  # (x [B, *shape] or features [B, F], y [B])
# l_ft trains on cached backbone features when they take at most this much memory ([N, F] float32).
FEATURE_CACHE_MAX_BYTES = 2 * 2**30


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return getattr(model, "module", model)


# ---------------------------------------------------------------------------------------------
# What trains, and how.


def trainable_parameters(model: ProbedModel, route: str) -> list[torch.nn.Parameter]:
    """l_ft freezes the backbone (requires_grad off); every other route trains everything."""
    head_only = route == "l_ft"
    for p in model.backbone.parameters():
        p.requires_grad_(not head_only)
    return model.head_parameters() if head_only else [p for p in model.parameters() if p.requires_grad]


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


class _Head(torch.nn.Module):
    """The head of a ProbedModel (probe layer, mask, last layer) on cached features [B, F] -> [B, C];
    its parameters are the model's own, so training it trains the model's head."""

    def __init__(self, model: ProbedModel):
        super().__init__()
        self.model = model

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.head_from_probe(self.model.probe(features))


@torch.no_grad()
def backbone_features(model: ProbedModel, x: torch.Tensor, device: torch.device, batch_size: int = 1024):
    """x [N, *shape] -> [N, F] features of the backbone in eval mode (BatchNorm statistics frozen)."""
    model.backbone.eval()
    return torch.cat([model.features(x[i : i + batch_size].to(device)) for i in range(0, len(x), batch_size)])


# ---------------------------------------------------------------------------------------------
# Data for the loop.


def epoch_order(n: int, seed: int, epoch: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    """This rank's sample positions for one epoch: a permutation seeded by (seed, epoch), padded by
    wrapping to a multiple of `world` and strided by rank."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    if world > 1:
        total = -(-n // world) * world
        order = order.repeat(-(-total // max(n, 1)))[:total][rank::world]
    return order


def per_rank_batch(batch_size: int, world: int) -> int:
    """Each of `world` ranks' batch, so that their batches together are one `batch_size` batch of the
    one-process run (rounded up when `world` does not divide it: the global batch grows by < world)."""
    return max(1, -(-batch_size // world))


class EpochData(Protocol):
    """Where the loop's batches come from: samples in memory (`InMemory`, this rank's stride of each epoch's
    permutation) or L-FT's backbone features (`CachedFeatures`)."""

    def batches(self, epoch: int) -> Iterable[Batch]: ...

    def held(self) -> tuple[np.ndarray, torch.Tensor, torch.Tensor] | None:
        """(sample ids [n], x [n, *shape], y [n]) this worker holds in memory, for end-of-epoch eval
        passes (the training trajectory); None when it holds nothing (yet)."""
        ...


@dataclass
class InMemory:
    """Samples held as tensors: x [N, *shape] (or backbone features [N, F]), y [N], ids [N]."""

    x: torch.Tensor
    y: torch.Tensor
    ids: np.ndarray
    batch_size: int
    seed: int
    rank: int = 0
    world: int = 1

    @classmethod
    def from_arrays(cls, x: np.ndarray, y: np.ndarray, ids: np.ndarray, batch_size: int, seed: int, **kw) -> InMemory:
        # copies: the arrays may be read-only views of Arrow buffers
        return cls(torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.long), ids, batch_size, seed, **kw)

    def batches(self, epoch: int) -> Iterator[Batch]:
        order = epoch_order(len(self.y), self.seed, epoch, self.rank, self.world)
        for start in range(0, len(order), self.batch_size):
            index = order[start : start + self.batch_size]
            yield self.x[index], self.y[index]

    def held(self) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
        return self.ids, self.x, self.y


class CachedFeatures:
    """l_ft's data: the frozen backbone's features [N, F] with the labels, batched like `InMemory`. Either
    `given` (kept by the attribution pass, which runs the backbone over every training sample already),
    or computed from `data` once, when the first epoch asks for its batches (so the route pays for them
    in its training time)."""

    def __init__(self, model: ProbedModel | None, data: InMemory | None, device, features: InMemory | None = None):
        self.model, self.data, self.device = model, data, device
        self.features = features

    @classmethod
    def given(cls, features: InMemory) -> CachedFeatures:
        return cls(None, None, None, features)

    def batches(self, epoch: int) -> Iterator[Batch]:
        if self.features is None:
            d = self.data
            x = backbone_features(self.model, d.x, self.device).cpu()  # [N, F]
            self.features = InMemory(x, d.y, d.ids, d.batch_size, d.seed, d.rank, d.world)
        return self.features.batches(epoch)

    def held(self) -> tuple[np.ndarray, torch.Tensor, torch.Tensor] | None:
        # the samples themselves, for eval passes through the whole model (none when only features are held)
        return self.data.held() if self.data is not None else None


def prepare(
    model: ProbedModel, route: str, cfg: TrainConfig, data: EpochData, device: torch.device
) -> tuple[torch.nn.Module, torch.optim.Optimizer, EpochData]:
    """-> (the module to train, its optimizer, the data it trains on) for `route`. l_ft with its samples in
    memory trains the head on backbone features computed once (or given, `CachedFeatures`): the same
    arithmetic as a backbone pass every epoch (the backbone is frozen and in eval mode), without it."""
    params = trainable_parameters(model, route)  # before any wrapping: freezes the l_ft backbone
    model.to(device)
    if route == "l_ft" and isinstance(data, CachedFeatures):
        return _Head(model), make_optimizer(params, cfg), data
    fits = isinstance(data, InMemory) and len(data.x) * model.fc.in_features * 4 <= FEATURE_CACHE_MAX_BYTES
    if route == "l_ft" and fits:
        return _Head(model), make_optimizer(params, cfg), CachedFeatures(model, data, device)
    return model, make_optimizer(params, cfg), data


# ---------------------------------------------------------------------------------------------
# The loop.


class Callback:
    """Hooks of `fit`; override what you need. Callbacks run in list order after each epoch, outside
    its timed part; they may add keys to `metrics` (later callbacks and the history see them)."""

    name = "callback"

    def on_epoch_end(self, epoch: int, metrics: dict[str, Any], state: LoopState) -> None:
        pass

    def state_dict(self) -> dict[str, Any] | None:
        """What a resumable checkpoint keeps of this callback (None: nothing)."""
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


@dataclass
class LoopState:
    """Where a training run stands: epochs done, training seconds, one metrics dict per epoch."""

    epoch: int = 0
    seconds_train: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)
    stop: bool = False  # set by a callback (a time budget): the loop ends after this epoch

    @property
    def seconds_per_epoch(self) -> float:
        return self.seconds_train / max(self.epoch, 1)


def train_epoch(
    model: torch.nn.Module, batches: Iterable[Batch], optimizer: torch.optim.Optimizer, route: str, device
) -> dict[str, float]:
    """One pass over `batches` of (x [B, ...], y [B]); returns mean loss and accuracy on them."""
    model.train()
    inner = unwrap(model)
    if route == "l_ft" and hasattr(inner, "backbone"):  # frozen backbone: keep its BatchNorm statistics frozen too
        inner.backbone.eval()
    total_loss, correct, seen = 0.0, 0, 0
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total_loss += float(loss.detach()) * len(y)
        correct += int((logits.argmax(1) == y).sum())
        seen += len(y)
    return {"train_loss": total_loss / max(seen, 1), "train_accuracy": correct / max(seen, 1), "n": seen}


def fit(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    data: EpochData,
    epochs: int,
    route: str,
    device: torch.device,
    state: LoopState | None = None,
    callbacks: Sequence[Callback] = (),
) -> LoopState:
    """Train `model` in place from `state` (a resumed run) up to `epochs`; time every epoch."""
    state = state or LoopState()
    for epoch in range(state.epoch, epochs):
        start = time.perf_counter()
        metrics: dict[str, Any] = train_epoch(model, data.batches(epoch), optimizer, route, device)
        elapsed = time.perf_counter() - start
        state.epoch, state.seconds_train = epoch + 1, state.seconds_train + elapsed
        metrics = {"epoch": epoch + 1, "seconds": elapsed, "seconds_train": state.seconds_train, **metrics}
        state.history.append(metrics)
        for callback in callbacks:
            callback.on_epoch_end(epoch + 1, metrics, state)
        if state.stop:
            break
    return state


def train_arrays(
    model: ProbedModel,
    x: np.ndarray,
    y: np.ndarray,
    cfg: TrainConfig,
    route: str,
    device: torch.device | str = "cpu",
    seed: int = 0,
    callbacks: Sequence[Callback] = (),
) -> LoopState:
    """Arrays in, trained model: x [N, *shape], y [N] through `prepare` and `fit` (what a training stage
    runs, without its files, checkpoints or data shards) -> the loop's state."""
    device = torch.device(device)
    data = InMemory.from_arrays(x, y, np.arange(len(y)), cfg.batch_size, seed)
    trainee, optimizer, data = prepare(model, route, cfg, data, device)
    return fit(trainee, optimizer, data, cfg.epochs, route, device, callbacks=callbacks)


# ---------------------------------------------------------------------------------------------
# Evaluation.


@torch.no_grad()
def predict_logits(model: torch.nn.Module, x, batch_size: int, device: torch.device) -> np.ndarray:
    """x [N, *shape] (numpy or torch) -> logits [N, C]; leaves the model in eval mode."""
    model.eval()
    out = []
    for start in range(0, len(x), batch_size):
        xb = x[start : start + batch_size]
        xb = xb.to(device) if isinstance(xb, torch.Tensor) else torch.tensor(xb, dtype=torch.float32, device=device)
        out.append(model(xb).cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 0), dtype=np.float32)


def evaluate(model: torch.nn.Module, x, y, device: torch.device, batch_size: int = 512) -> dict[str, float]:
    """Accuracy, macro precision and macro F1 of `model` on (x, y)."""
    logits = predict_logits(model, x, batch_size, device)
    return classification_metrics(np.asarray(y), logits.argmax(axis=1))
