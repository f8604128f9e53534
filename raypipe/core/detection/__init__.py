"""Detection of mislabelled samples that survives a model which memorized its noisy labels (docs/detection.md).

- `knn`: neighbour label agreement in the probe space (`KnnIndex`, `KnnVotes`, `prepare_features`).
- `trajectory`: margin (AUM) and early loss along training (`TrajectoryRecorder`, `margins_and_losses`).
- `combine`: choosing or combining suspicion scores without ground truth (`combine_signals`).
- `decide`: the per-class decision on a suspicion score (`class_conditional_flags`, `ClassFlags`).

Arrays in, arrays out: no Ray, no file I/O.
"""

from raypipe.core.detection.combine import combine_signals
from raypipe.core.detection.decide import class_conditional_flags
from raypipe.core.detection.knn import KnnIndex
from raypipe.core.detection.trajectory import TrajectoryRecorder

__all__ = ["KnnIndex", "TrajectoryRecorder", "class_conditional_flags", "combine_signals"]
