"""A user's own data set from Parquet: a local file or directory, or any pyarrow filesystem URI.

Parquet is the one format every data platform can write, and pyarrow reads it from local disk,
S3 and GCS alike, so it is how arbitrary data enters raypipe. The image column may be a list of
numbers or raw uint8 bytes; either way it is converted column-wise (no per-row Python loop).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from raypipe.config import DataConfig
from raypipe.data.samples import SampleSet
from raypipe.errors import ConfigError, DataError


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def read_parquet_table(path: str, columns: list[str], optional: list[str], key: str = "data.path") -> pa.Table:
    """`columns` (required) plus those of `optional` that exist, from a file, directory or URI.

    Files of a directory are read in sorted path order, so row positions (the default sample ids)
    are stable from run to run.
    """
    try:
        if "://" in path:
            filesystem, inner = pafs.FileSystem.from_uri(path)
            if filesystem.get_file_info(inner).type == pafs.FileType.NotFound:
                raise DataError(f"parquet: {key} '{path}' does not exist; point {key} at a file or directory")
        else:
            if not Path(path).exists():
                raise DataError(f"parquet: {key} '{path}' does not exist; point {key} at a file or directory")
            filesystem, inner = pafs.LocalFileSystem(), str(Path(path).resolve())
        found = pads.dataset(inner, filesystem=filesystem, format="parquet")
        files = sorted(found.files)
        if not files:
            raise DataError(f"parquet: no Parquet files under '{path}'; point {key} at a file or directory of them")
        dataset = pads.dataset(files, filesystem=filesystem, format="parquet")
        names = dataset.schema.names
        missing = [c for c in columns if c not in names]
        if missing:
            raise DataError(
                f"parquet: '{path}' has no column {missing[0]!r} (columns: {names}); "
                "set data.image_column / data.label_column / data.test_label_column / data.true_label_column"
            )
        return dataset.to_table(columns=columns + [c for c in optional if c in names and c not in columns])
    except DataError:
        raise
    except (OSError, pa.ArrowException, ValueError) as e:
        raise DataError(f"parquet: cannot read '{path}': {_first_line(e)}") from None


def parquet_files(path: str) -> list[str]:
    """The Parquet files under `path` (a file, a directory or a URI), as `read_parquet_table` finds them, as
    URIs or local paths; [] when there are none or they cannot be listed (the reader then says why)."""
    try:
        if "://" in path:
            filesystem, inner = pafs.FileSystem.from_uri(path)
            scheme = path.split("://", 1)[0] + "://"
        else:
            filesystem, inner, scheme = pafs.LocalFileSystem(), str(Path(path).resolve()), ""
        if filesystem.get_file_info(inner).type == pafs.FileType.NotFound:
            return []
        return [scheme + f for f in sorted(pads.dataset(inner, filesystem=filesystem, format="parquet").files)]
    except (OSError, pa.ArrowException, ValueError):
        return []


def _image_matrix(column: pa.ChunkedArray, where: str) -> np.ndarray:
    """Image column -> [N, L] array (uint8 for binary, else the list's value type)."""
    arr = column.combine_chunks()
    if isinstance(arr, pa.ExtensionArray):  # a fixed-shape tensor column (raypipe's own tables): row-major values
        arr = arr.storage
    n = len(arr)
    if arr.null_count:
        raise DataError(f"{where}: {arr.null_count} row(s) have no image; drop them first")
    t = arr.type
    if pa.types.is_fixed_size_list(t):
        values = arr.flatten()  # respects slicing offsets
        lengths = None
        width = t.list_size
    elif pa.types.is_list(t) or pa.types.is_large_list(t):
        values = arr.flatten()
        offsets = arr.offsets.to_numpy()
        lengths = np.diff(offsets)  # [N]
        width = int(lengths[0]) if n else 0
    elif pa.types.is_fixed_size_binary(t):
        width = t.byte_width
        data = np.frombuffer(arr.buffers()[1], dtype=np.uint8)
        return data[arr.offset * width : (arr.offset + n) * width].reshape(n, width)
    elif pa.types.is_binary(t) or pa.types.is_large_binary(t):
        offset_type = np.int64 if pa.types.is_large_binary(t) else np.int32
        offsets = np.frombuffer(arr.buffers()[1], dtype=offset_type)[arr.offset : arr.offset + n + 1]
        lengths = np.diff(offsets)
        width = int(lengths[0]) if n else 0
        if n and (lengths != width).any():
            raise DataError(f"{where}: images have different byte lengths ({lengths.min()}..{lengths.max()})")
        if n and width == 0:
            raise DataError(f"{where}: every row is empty (0 bytes); each row must hold one sample's pixels")
        data = np.frombuffer(arr.buffers()[2], dtype=np.uint8)
        return data[offsets[0] : offsets[-1]].reshape(n, width)
    else:
        raise DataError(f"{where} has type {t}; use a list of numbers or binary (raw uint8 bytes)")
    if lengths is not None and n and (lengths != width).any():
        raise DataError(f"{where}: rows have different lengths ({lengths.min()}..{lengths.max()}); pad or resize them")
    if n and width == 0:
        raise DataError(f"{where}: every row is empty (0 values); each row must hold one sample's values")
    value_type = values.type
    if not (pa.types.is_integer(value_type) or pa.types.is_floating(value_type)):
        raise DataError(f"{where} holds {value_type} values; use numbers (uint8 pixels or floats)")
    if values.null_count:
        raise DataError(f"{where} has {values.null_count} null value(s) inside images; fill or drop them")
    return values.to_numpy(zero_copy_only=False).reshape(n, width)


def check_columns(cfg: DataConfig) -> None:
    """The image and label columns are two columns, neither of them the sample ids."""
    if cfg.image_column == cfg.label_column:
        raise ConfigError(
            f"config key 'data.image_column': '{cfg.image_column}' is also data.label_column; name the column of "
            "the images (or features) and the column of the labels"
        )
    for key in ("image_column", "label_column"):
        if getattr(cfg, key) == "sample_id":
            raise ConfigError(f"config key 'data.{key}': 'sample_id' is the sample id column; name another")


def read_parquet_source(cfg: DataConfig) -> tuple[SampleSet, SampleSet | None, str]:
    """data.path as a SampleSet (with the known true labels of data.true_label_column), data.test_path (when
    set) as the test set, and a description of where they came from."""
    if cfg.path is None:
        raise ConfigError("config key 'data.path': source 'parquet' needs a file, directory or URI; set data.path=...")
    where = f"parquet data '{cfg.path}'"
    check_columns(cfg)
    pool = _read_samples(cfg, cfg.path, where, cfg.label_column, cfg.true_label_column, "data.path")
    if cfg.test_path is None:
        return pool, None, where
    test_where = f"parquet test data '{cfg.test_path}'"
    test_label = cfg.test_label_column or cfg.label_column
    test = _read_samples(cfg, cfg.test_path, test_where, test_label, None, "data.test_path", pool.num_classes)
    if test.x.shape[1:] != pool.x.shape[1:]:
        raise DataError(
            f"{test_where}: samples of shape {list(test.x.shape[1:])}, the training data's are {list(pool.x.shape[1:])}"
        )
    if np.isin(test.sample_id, pool.sample_id).any():  # default ids are positions: the test table's come after
        test = dataclasses.replace(test, sample_id=test.sample_id + int(pool.sample_id.max()) + 1)
    return pool, test, f"{where}, test {test_where}"


def _labels(table: pa.Table, column: str, where: str) -> np.ndarray:
    labels = table.column(column)
    if not pa.types.is_integer(labels.type):
        raise DataError(f"{where}: label column '{column}' has type {labels.type}; labels must be integers")
    if labels.null_count:
        raise DataError(f"{where}: label column '{column}' has {labels.null_count} null(s); drop those rows")
    return labels.to_numpy().astype(np.int64)


def _read_samples(
    cfg: DataConfig, path: str, where: str, label_column: str, true_column: str | None, key: str, num_classes=None
) -> SampleSet:
    columns = [cfg.image_column, label_column, *([true_column] if true_column else [])]
    table = read_parquet_table(path, columns, ["sample_id"], key)
    n = table.num_rows
    if n == 0:
        raise DataError(f"{where} holds no rows; point {key} at a non-empty table")

    flat = _image_matrix(table.column(cfg.image_column), f"{where}, column '{cfg.image_column}'")  # [N, L]
    x = flat.astype(np.float32) / np.float32(255.0) if flat.dtype == np.uint8 else flat.astype(np.float32)
    length = flat.shape[1]
    if cfg.shape is not None:
        shape = tuple(cfg.shape)
        if int(np.prod(shape)) != length:
            raise DataError(
                f"{where}: data.shape {list(shape)} holds {int(np.prod(shape))} values but each "
                f"'{cfg.image_column}' row has {length}; fix data.shape"
            )
        x = x.reshape(n, *shape)
    label = _labels(table, label_column, where)

    if "sample_id" in table.column_names:
        ids = table.column("sample_id")
        if not pa.types.is_integer(ids.type) or ids.null_count:
            raise DataError(f"{where}: column 'sample_id' must be non-null integers (has type {ids.type})")
        sample_id = ids.to_numpy().astype(np.int64)
        if len(np.unique(sample_id)) != n:
            raise DataError(f"{where}: column 'sample_id' has duplicates; ids must be unique (or drop the column)")
    else:
        sample_id = np.arange(n, dtype=np.int64)

    num_classes = num_classes or cfg.num_classes
    if num_classes is None:
        num_classes = int(label.max()) + 1
        if num_classes > n:
            raise DataError(
                f"{where}: labels go up to {num_classes - 1} ({num_classes} classes) but there are {n} samples; "
                "labels must be class indices 0..C-1 (renumber them), or set data.num_classes"
            )
    samples = SampleSet.clean(sample_id, x, label, num_classes)
    if true_column is None:
        return samples
    true = _labels(table, true_column, where)
    return dataclasses.replace(samples, true_label=true, is_corrupted=true != label)
