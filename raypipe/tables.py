"""numpy columns <-> Arrow tables. Arrays of more than one dimension travel as fixed-shape tensor columns
(pyarrow's canonical ``arrow.fixed_shape_tensor`` extension type, one row a sample), so Parquet files hold
per-sample vectors without a per-row Python loop, Ray Data reads such a column as an ``[n, *shape]`` batch and
pandas as one array per row. Columns written as fixed_size_list (runs of earlier versions) read back the same."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def tensor_column(values: np.ndarray) -> pa.Array:
    """[N, *shape] -> a fixed-shape tensor column of N rows of `shape` (C order)."""
    values = np.asarray(values)
    shape = [int(d) for d in values.shape[1:]]
    flat = pa.array(np.ascontiguousarray(values).reshape(-1))
    storage = pa.FixedSizeListArray.from_arrays(flat, int(np.prod(shape, dtype=np.int64)))
    # built from its storage: from_numpy_ndarray would read a size-1 axis's stride as a permutation
    return pa.ExtensionArray.from_storage(pa.fixed_shape_tensor(flat.type, shape), storage)


def column_to_arrow(values: np.ndarray) -> pa.Array:
    values = np.asarray(values)
    if values.ndim == 1:
        return pa.array(values)
    return tensor_column(values.reshape(len(values), -1))  # [N, *shape] -> rows of [prod(shape)]


def row_width(tp: pa.DataType) -> int:
    """The number of values in each row of a tensor (or fixed_size_list) column of type `tp`."""
    if isinstance(tp, pa.BaseExtensionType):  # a fixed-shape tensor: its storage is the fixed_size_list
        tp = tp.storage_type
    return tp.list_size


def column_from_arrow(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A scalar column -> [N]; a tensor or fixed_size_list column -> [N, width]."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if isinstance(column, pa.ExtensionArray):  # a fixed-shape tensor: its storage is the fixed_size_list
        column = column.storage
    if pa.types.is_fixed_size_list(column.type):
        width = column.type.list_size
        flat = column.flatten().to_numpy(zero_copy_only=False)
        return flat.reshape(len(column), width)
    return column.to_numpy(zero_copy_only=False)


def table_from_columns(columns: dict[str, np.ndarray]) -> pa.Table:
    return pa.table({name: column_to_arrow(values) for name, values in columns.items()})


def columns_from_table(table: pa.Table, names: list[str] | None = None) -> dict[str, np.ndarray]:
    return {name: column_from_arrow(table.column(name)) for name in (names or table.column_names)}


def keep_ids(table: pa.Table, ids: np.ndarray) -> pa.Table:
    """The rows of `table` whose sample_id is in `ids`."""
    return table.filter(pc.is_in(table["sample_id"], value_set=pa.array(ids)))
