"""The in-memory form of a data split, and the checks every source passes before it is used.

Every stage downstream of the data needs the same five arrays side by side: a stable id (so that
attributions, partitions and reports can be joined back to a sample), the input, the given label,
the original label and the ground-truth corruption mask. `SampleSet` keeps them together and
sliceable as one unit so they can never drift out of step.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from raypipe.errors import DataError

BATCH_KEYS = ("sample_id", "x", "label", "true_label", "is_corrupted")


# eq=False: the fields are numpy arrays, for which the generated __eq__ would be ambiguous.
@dataclass(frozen=True, eq=False)
class SampleSet:
    sample_id: np.ndarray  # int64 [N], position in the source's canonical order
    x: np.ndarray  # float32 [N, *sample_shape]
    label: np.ndarray  # int64 [N], the given (possibly noisy) label
    true_label: np.ndarray  # int64 [N], the original label
    is_corrupted: np.ndarray  # bool [N], ground truth: label flipped or input noised
    num_classes: int

    def __post_init__(self) -> None:
        n = len(self.sample_id)
        lengths = {name: len(getattr(self, name)) for name in BATCH_KEYS}
        if any(length != n for length in lengths.values()):
            raise ValueError(f"SampleSet arrays differ in length: {lengths}")

    @classmethod
    def clean(cls, sample_id: np.ndarray, x: np.ndarray, label: np.ndarray, num_classes: int) -> SampleSet:
        """A set as a loader produces it: label == true_label, nothing corrupted."""
        label = np.asarray(label, dtype=np.int64)
        return cls(
            sample_id=np.asarray(sample_id, dtype=np.int64),
            x=np.asarray(x, dtype=np.float32),
            label=label,
            true_label=label.copy(),
            is_corrupted=np.zeros(len(label), dtype=bool),
            num_classes=int(num_classes),
        )

    def __len__(self) -> int:
        return len(self.sample_id)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def subset(self, index: np.ndarray) -> SampleSet:
        """The samples at `index`: int positions (in that order) or a bool mask of length N."""
        index = np.asarray(index)
        if index.dtype == bool and index.shape != (len(self),):
            raise ValueError(f"bool mask of shape {index.shape} for a SampleSet of {len(self)} samples")
        return SampleSet(
            sample_id=self.sample_id[index],
            x=self.x[index],
            label=self.label[index],
            true_label=self.true_label[index],
            is_corrupted=self.is_corrupted[index],
            num_classes=self.num_classes,
        )

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Dicts of numpy slices (keys BATCH_KEYS), the last batch possibly short.

        Unshuffled batches are views; shuffled ones are copies in a seeded permutation order.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        n = len(self)
        order = np.random.default_rng(seed).permutation(n) if shuffle else None
        for start in range(0, n, batch_size):
            index = slice(start, start + batch_size) if order is None else order[start : start + batch_size]
            yield {key: getattr(self, key)[index] for key in BATCH_KEYS}


def validate_samples(s: SampleSet, where: str, expected_shape: tuple[int, ...] | None = None) -> None:
    """Raise DataError (one line, naming `where`) when `s` is unusable for training.

    `where` names the source and file/path, e.g. "fashion-mnist data in '/usr/share/...'".
    """
    if len(s) == 0:
        raise DataError(f"{where} holds no samples; point data.path at a non-empty data set")
    if expected_shape is not None and s.sample_shape != tuple(expected_shape):
        raise DataError(
            f"{where} has samples of shape {s.sample_shape}, expected {tuple(expected_shape)}; "
            "check that data.source matches the files"
        )
    if not np.isfinite(s.x).all():
        bad = int((~np.isfinite(s.x.reshape(len(s), -1))).any(axis=1).sum())
        raise DataError(f"{where} has NaN or inf values in {bad} sample(s); clean or drop them first")
    for name in ("label", "true_label"):
        labels = getattr(s, name)
        outside = (labels < 0) | (labels >= s.num_classes)
        if outside.any():
            first = int(labels[np.argmax(outside)])
            raise DataError(
                f"{where} has {int(outside.sum())} {name}(s) outside [0, {s.num_classes}) (e.g. {first}); "
                "fix the labels or set data.num_classes"
            )
    if len(np.unique(s.true_label)) < 2:
        raise DataError(
            f"{where} has a single class ({int(s.true_label[0])}); a classifier needs samples of at least 2 classes"
        )
    if s.num_classes < 2:
        raise DataError(f"{where} declares {s.num_classes} class(es); a classifier needs at least 2")
    if len(np.unique(s.sample_id)) != len(s):
        raise DataError(f"{where} has duplicate sample ids; sample_id must be unique")
