"""SampleSet <-> Arrow table, the form in which stages hand samples to each other (as Parquet).

The table is columnar, x a fixed-shape tensor column of float32 [*sample_shape] (pyarrow's canonical
extension type: Ray Data reads it as an [n, *sample_shape] batch, pandas as one array per row; tables
of earlier versions hold x as a flat fixed_size_list and read back the same). The sample shape and
class count also ride in the schema metadata; batches sliced out by Ray Data may lose that metadata, which is why
`batch_from_table` takes the shape explicitly. All conversions are column-wise: no per-row loop.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

from raypipe.data.samples import BATCH_KEYS, SampleSet
from raypipe.errors import DataError
from raypipe.tables import tensor_column

SHAPE_KEY = b"sample_shape"
CLASSES_KEY = b"num_classes"


def table_from_samples(s: SampleSet) -> pa.Table:
    """Columns sample_id int64, x tensor<float32>[*sample_shape], label, true_label int64, is_corrupted bool."""
    x = tensor_column(np.asarray(s.x, dtype=np.float32).reshape(len(s), *s.sample_shape))
    schema = pa.schema(
        [
            ("sample_id", pa.int64()),
            ("x", x.type),
            ("label", pa.int64()),
            ("true_label", pa.int64()),
            ("is_corrupted", pa.bool_()),
        ],
        metadata={SHAPE_KEY: json.dumps(list(s.sample_shape)).encode(), CLASSES_KEY: str(s.num_classes).encode()},
    )
    columns = [
        pa.array(np.asarray(s.sample_id, dtype=np.int64)),
        x,
        pa.array(np.asarray(s.label, dtype=np.int64)),
        pa.array(np.asarray(s.true_label, dtype=np.int64)),
        pa.array(np.asarray(s.is_corrupted, dtype=bool)),
    ]
    return pa.Table.from_arrays(columns, schema=schema)


def _column_numpy(t: pa.Table, name: str, dtype: type) -> np.ndarray:
    return np.asarray(t.column(name).to_numpy(), dtype=dtype)


def batch_from_table(t: pa.Table, sample_shape) -> dict[str, np.ndarray]:
    """Any slice of a `table_from_samples` table -> the batch dict (x float32 [B, *sample_shape])."""
    missing = [k for k in BATCH_KEYS if k not in t.column_names]
    if missing:
        raise DataError(f"sample table lacks column(s) {missing}; it was not written by table_from_samples")
    shape = tuple(int(d) for d in sample_shape)
    x_col = t.column("x").combine_chunks()  # one (fixed-size) list array; may carry a slice offset
    if isinstance(x_col, pa.ExtensionArray):  # a fixed-shape tensor: its storage is a fixed_size_list
        x_col = x_col.storage
    if not (
        pa.types.is_fixed_size_list(x_col.type) or pa.types.is_list(x_col.type) or pa.types.is_large_list(x_col.type)
    ):
        raise DataError(f"sample table column 'x' has type {x_col.type}, expected a list of float32")
    values = x_col.flatten().to_numpy(zero_copy_only=False)  # [B * D], honours the slice offset
    return {
        "sample_id": _column_numpy(t, "sample_id", np.int64),
        "x": values.astype(np.float32, copy=False).reshape(t.num_rows, *shape),
        "label": _column_numpy(t, "label", np.int64),
        "true_label": _column_numpy(t, "true_label", np.int64),
        "is_corrupted": _column_numpy(t, "is_corrupted", bool),
    }


def sample_format(schema: pa.Schema) -> tuple[tuple[int, ...], int]:
    """(sample shape, class count) from a `table_from_samples` table's schema metadata."""
    metadata = schema.metadata or {}
    if SHAPE_KEY not in metadata or CLASSES_KEY not in metadata:
        raise DataError(
            "sample table has no sample_shape / num_classes metadata; use batch_from_table(table, sample_shape)"
        )
    return tuple(json.loads(metadata[SHAPE_KEY])), int(metadata[CLASSES_KEY])


def samples_from_table(t: pa.Table) -> SampleSet:
    """Inverse of table_from_samples, shape and class count read from the schema metadata."""
    shape, num_classes = sample_format(t.schema)
    return SampleSet(**batch_from_table(t, shape), num_classes=num_classes)
