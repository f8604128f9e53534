"""Data: sources with stable sample ids, noise injection with its ground truth, Parquet handover.

No Ray here: these are plain numpy / pyarrow functions that the local executor and the Ray stages
both call.
"""

from raypipe.data.handover import batch_from_table, sample_format, samples_from_table, table_from_samples
from raypipe.data.noise import ASYMMETRIC_PAIRS, apply_noise, describe_noise, injected_noise
from raypipe.data.samples import SampleSet
from raypipe.data.sources import input_files, labels_of_test_split, load_splits

__all__ = [
    "ASYMMETRIC_PAIRS",
    "SampleSet",
    "apply_noise",
    "batch_from_table",
    "describe_noise",
    "injected_noise",
    "input_files",
    "load_splits",
    "labels_of_test_split",
    "sample_format",
    "samples_from_table",
    "table_from_samples",
]
