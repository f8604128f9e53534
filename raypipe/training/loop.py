"""One training loop for every route, and evaluation. Plain torch + scikit-learn metrics, no Ray.

Routes (METHOD.md step 4):
- initial: a fresh model on all (noisy) training samples: the model to repair;
- retrain: a fresh model on the clean part only (baseline);
- l_ft:    from the pruned model, on the clean part, only the head (fc, fc2) trains;
- f_ft:    from the pruned model, on the clean part, every layer trains.
The Ray Train wrapper calls the same `train_epoch` on its shard of the data.

In one process, l_ft computes the frozen backbone's features once (eval mode, as its epochs see
them) and trains the head on them: the same arithmetic, without a backbone forward pass per epoch
(METHOD.md: the paper's L-FT still ran the backbone every epoch).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, f1_score, precision_score

from raypipe.config import TrainConfig
from raypipe.core.models import ProbedModel

FRESH_ROUTES = ("initial", "retrain")  # start from a new model; the others from the pruned one
# l_ft trains on cached backbone features when they take at most this much memory ([N, F] float32).
FEATURE_CACHE_MAX_BYTES = 2 * 2**30


class _Head(torch.nn.Module):
    """The head of a ProbedModel (probe layer, mask, last layer) on cached features [B, F] -> [B, C];
    its parameters are the model's own, so training it trains the model's head."""

    def __init__(self, model: ProbedModel):
        super().__init__()
        self.model = model

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.head_from_probe(self.model.probe(features))


@torch.no_grad()
def backbone_features(
    model: ProbedModel, x: torch.Tensor, device: torch.device, batch_size: int = 1024
) -> torch.Tensor:
    """x [N, *shape] -> [N, F] features of the backbone in eval mode (BatchNorm statistics frozen)."""
    model.backbone.eval()
    return torch.cat([model.features(x[i : i + batch_size].to(device)) for i in range(0, len(x), batch_size)])


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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


def tensor_batches(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool, generator: torch.Generator | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    order = torch.randperm(len(y), generator=generator) if shuffle else torch.arange(len(y))
    for start in range(0, len(y), batch_size):
        index = order[start : start + batch_size]
        yield x[index], y[index]


def train_epoch(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    route: str,
    device: torch.device,
) -> dict[str, float]:
    """One pass over `batches` of (x [B, *shape], y [B]); returns mean loss and accuracy on them."""
    model.train()
    inner = getattr(model, "module", model)
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


@torch.no_grad()
def predict_logits(model: torch.nn.Module, x: np.ndarray, batch_size: int, device: torch.device) -> np.ndarray:
    """x [N, *shape] -> logits [N, C]."""
    model.eval()
    out = []
    for start in range(0, len(x), batch_size):
        xb = torch.tensor(x[start : start + batch_size], dtype=torch.float32, device=device)  # copy: may be read-only
        out.append(model(xb).cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 0), dtype=np.float32)


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_precision": float(precision_score(y_true, y_pred, average="macro", zero_division=0)),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
    }


def evaluate(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, device: torch.device, batch_size: int = 512):
    """Accuracy, macro precision and macro F1 of `model` on (x, y) (the clean test split)."""
    logits = predict_logits(model, x, batch_size, device)
    return classification_metrics(np.asarray(y), logits.argmax(axis=1))


@dataclass
class TrainResult:
    epochs: int = 0
    seconds_total: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def seconds_per_epoch(self) -> float:
        return self.seconds_total / max(self.epochs, 1)


def fit(
    model: ProbedModel,
    x: np.ndarray,
    y: np.ndarray,
    cfg: TrainConfig,
    route: str,
    device: torch.device,
    seed: int = 0,
    on_epoch: Callable[[int, ProbedModel, dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train `model` in place on x [N, *shape], y [N] for cfg.epochs; time every epoch.

    `on_epoch(epoch, model, metrics)` runs after each epoch, outside the timed part (used for
    progress lines, checkpoints and trajectory signals).
    """
    model.to(device)
    optimizer = make_optimizer(trainable_parameters(model, route), cfg)
    x_t = torch.tensor(x, dtype=torch.float32)  # a copy: the arrays may be read-only views
    y_t = torch.tensor(y, dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    result = TrainResult()
    trained = model
    if route == "l_ft" and len(x_t) * model.fc.in_features * 4 <= FEATURE_CACHE_MAX_BYTES:
        start = time.perf_counter()
        x_t, trained = backbone_features(model, x_t, device).cpu(), _Head(model)  # [N, F]
        result.seconds_total += time.perf_counter() - start  # counted as training time: the route pays it
    for epoch in range(cfg.epochs):
        start = time.perf_counter()
        metrics = train_epoch(
            trained, tensor_batches(x_t, y_t, cfg.batch_size, True, generator), optimizer, route, device
        )
        elapsed = time.perf_counter() - start
        result.epochs += 1
        result.seconds_total += elapsed
        metrics = {"epoch": epoch + 1, "seconds": elapsed, **metrics}
        result.history.append(metrics)
        if on_epoch is not None:
            on_epoch(epoch + 1, model, metrics)
    return result
