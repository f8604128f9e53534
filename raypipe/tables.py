"""numpy columns <-> Arrow tables. 2-D arrays travel as fixed_size_list columns (one row a sample),
so Parquet files and Ray Data batches hold per-sample vectors without a per-row Python loop."""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def column_to_arrow(values: np.ndarray) -> pa.Array:
    values = np.asarray(values)
    if values.ndim == 1:
        return pa.array(values)
    rows = values.reshape(len(values), -1)  # [N, *shape] -> [N, prod(shape)]
    flat = pa.array(np.ascontiguousarray(rows).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, rows.shape[1])


def column_from_arrow(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A scalar column -> [N]; a fixed_size_list column -> [N, width]."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if pa.types.is_fixed_size_list(column.type):
        width = column.type.list_size
        flat = column.flatten().to_numpy(zero_copy_only=False)
        return flat.reshape(len(column), width)
    return column.to_numpy(zero_copy_only=False)


def table_from_columns(columns: dict[str, np.ndarray]) -> pa.Table:
    return pa.table({name: column_to_arrow(values) for name, values in columns.items()})


def columns_from_table(table: pa.Table, names: list[str] | None = None) -> dict[str, np.ndarray]:
    return {name: column_from_arrow(table.column(name)) for name in (names or table.column_names)}
