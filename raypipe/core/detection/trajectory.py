"""Training-trajectory signals: per-sample margin (AUM), early loss and wrong-event counts, recorded along training.

Before the model memorizes its labels, a mislabelled sample has a high loss, a negative margin and a prediction
that disagrees with its given label; the loss at an early epoch, the area under the margin (AUM, Pleiss et al.
2020) and the number of epochs in which the prediction was wrong (wrong events, Zhang et al. 2025) keep that
memory after it has.
"""

from __future__ import annotations

import numpy as np
import torch


def _as_numpy(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def margins_and_losses(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """logits [B, C], labels [B] -> (margin [B], cross-entropy loss [B]), float64.

    margin = z_y - max_{c != y} z_c (Pleiss et al.'s margin: negative while the sample is misclassified);
    loss = logsumexp(z) - z_y.
    """
    z = _as_numpy(logits).astype(np.float64)
    y = _as_numpy(labels).astype(np.int64)
    rows = np.arange(len(y))
    z_y = z[rows, y]
    others = z.copy()
    others[rows, y] = -np.inf
    margin = z_y - others.max(axis=1)
    z_max = z.max(axis=1)
    loss = z_max + np.log(np.exp(z - z_max[:, None]).sum(axis=1)) - z_y
    return margin, loss


class TrajectoryRecorder:
    """Per-sample margin, loss and wrong events along training, fed the logits the training loop computes anyway.

    Feed it once per epoch per sample (`update(index, logits, labels, epoch)`), from the training batches' logits
    or from an end-of-epoch eval pass (then the values are exactly those of the epoch's checkpoint). AUM = mean
    margin over all updates of a sample; a wrong event = an update whose arg-max prediction is not the given label
    (margin <= 0: a tie counts as wrong); suspicion scores: -aum(), early_loss(epoch) and wrong_event_share().
    index: positions in [0, num_samples), or sample ids when the recorder was built with sample_ids.
    keep_loss_epochs: the epochs whose per-sample loss is kept (default all; 4 bytes per sample each).
    Data-parallel training: one full-size recorder per worker, `merge`d on the driver; checkpoint it with
    `state_dict` / `load_state_dict`.
    """

    def __init__(
        self,
        num_samples: int | None = None,
        sample_ids: np.ndarray | None = None,
        keep_loss_epochs: list[int] | range | None = None,
    ):
        if sample_ids is not None:
            sample_ids = np.asarray(sample_ids, dtype=np.int64)
            num_samples = len(sample_ids) if num_samples is None else num_samples
            if num_samples != len(sample_ids):
                raise ValueError(f"num_samples={num_samples} but {len(sample_ids)} sample_ids")
            self._order = np.argsort(sample_ids, kind="stable")
            self._sorted_ids = sample_ids[self._order]
            if np.any(self._sorted_ids[1:] == self._sorted_ids[:-1]):
                raise ValueError("sample_ids must be unique")
        elif num_samples is None:
            raise ValueError("give num_samples or sample_ids")
        else:
            self._order = self._sorted_ids = None
        self.num_samples = int(num_samples)
        self.sample_ids = sample_ids
        self.keep_loss_epochs = None if keep_loss_epochs is None else {int(e) for e in keep_loss_epochs}
        self.margin_sum = np.zeros(self.num_samples, dtype=np.float64)  # [N]
        self.count = np.zeros(self.num_samples, dtype=np.int64)  # [N] updates seen
        self.wrong_count = np.zeros(self.num_samples, dtype=np.int64)  # [N] updates whose prediction was not the label
        self.losses: dict[int, np.ndarray] = {}  # epoch -> float32 [N], NaN where not seen that epoch

    def _positions(self, index) -> np.ndarray:
        index = _as_numpy(index).astype(np.int64)
        if self._sorted_ids is None:
            if len(index) and (index.min() < 0 or index.max() >= self.num_samples):
                raise IndexError(f"positions must lie in [0, {self.num_samples})")
            return index
        pos = np.searchsorted(self._sorted_ids, index)
        pos_c = np.minimum(pos, self.num_samples - 1)
        if np.any((pos >= self.num_samples) | (self._sorted_ids[pos_c] != index)):
            raise KeyError("update got sample ids the recorder does not know")
        return self._order[pos_c]

    def update(self, index, logits, labels, epoch: int) -> None:
        """Record one batch: index [B] (positions or ids), logits [B, C] (torch or numpy), given labels [B]."""
        pos = self._positions(index)
        margin, loss = margins_and_losses(logits, labels)
        if len(np.unique(pos)) != len(pos):
            raise ValueError("a batch repeats a sample; record each sample once per update")
        self.margin_sum[pos] += margin
        self.count[pos] += 1
        self.wrong_count[pos] += margin <= 0
        if self.keep_loss_epochs is None or epoch in self.keep_loss_epochs:
            if epoch not in self.losses:
                self.losses[epoch] = np.full(self.num_samples, np.nan, dtype=np.float32)
            self.losses[epoch][pos] = loss

    def aum(self) -> np.ndarray:
        """float64 [N]: mean recorded margin per sample (NaN for samples never recorded). Suspicion = -aum()."""
        out = np.full(self.num_samples, np.nan)
        seen = self.count > 0
        out[seen] = self.margin_sum[seen] / self.count[seen]
        return out

    def wrong_event_share(self) -> np.ndarray:
        """float64 [N]: the share of a sample's updates in which the prediction was not its given label (NaN for
        samples never recorded). With one update per epoch: the share of the recorded epochs. Suspicion as is."""
        out = np.full(self.num_samples, np.nan)
        seen = self.count > 0
        out[seen] = self.wrong_count[seen] / self.count[seen]
        return out

    def early_loss(self, epoch: int) -> np.ndarray:
        """float32 [N]: the loss recorded at `epoch` (0-based, as passed to update); NaN where not recorded."""
        if epoch not in self.losses:
            raise KeyError(f"no losses recorded for epoch {epoch}; recorded: {sorted(self.losses)}")
        return self.losses[epoch].copy()

    def merge(self, other: TrajectoryRecorder) -> TrajectoryRecorder:
        """Add another recorder's updates (same samples, disjoint or not) into this one; returns self."""
        if other.num_samples != self.num_samples:
            raise ValueError("recorders of different sizes")
        self.margin_sum += other.margin_sum
        self.count += other.count
        self.wrong_count += other.wrong_count
        for e, loss in other.losses.items():
            mine = self.losses.setdefault(e, np.full(self.num_samples, np.nan, dtype=np.float32))
            np.copyto(mine, loss, where=~np.isnan(loss))
        return self

    def state_dict(self) -> dict:
        """What to checkpoint with the model (resume after a worker failure): torch tensors in str-keyed dicts,
        so that `torch.load(..., weights_only=True)` reads it back.

        {"margin_sum": float64 [N], "count": int64 [N], "wrong_count": int64 [N], "losses": {str(epoch): float32 [N]}}.
        """
        return {
            "margin_sum": torch.from_numpy(self.margin_sum.copy()),
            "count": torch.from_numpy(self.count.copy()),
            "wrong_count": torch.from_numpy(self.wrong_count.copy()),
            "losses": {str(e): torch.from_numpy(v.copy()) for e, v in self.losses.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a `state_dict()` (tensors or numpy arrays) into a recorder built for the same samples."""
        self.margin_sum = _as_numpy(state["margin_sum"]).astype(np.float64, copy=True)
        self.count = _as_numpy(state["count"]).astype(np.int64, copy=True)
        self.wrong_count = _as_numpy(state["wrong_count"]).astype(np.int64, copy=True)
        self.losses = {int(e): _as_numpy(v).astype(np.float32, copy=True) for e, v in state["losses"].items()}
