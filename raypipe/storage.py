"""Run storage: local paths or any pyarrow filesystem URI (s3://, gs://), atomic writes, manifests.

Stages hand over through files under the run directory, never through live objects. A stage is
finished exactly when its ``_manifest.json`` exists and holds the fingerprint of the settings and
inputs that made it; the manifest is written last, so a crash leaves a stage that looks unfinished.
Every file is published atomically (local: write a temporary file, then rename; object stores: an
object appears only when its upload completes).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from raypipe.errors import CheckpointError, RaypipeError

MANIFEST = "_manifest.json"


def absolute(uri: str) -> str:
    """A local path made absolute (Ray workers run in other working directories); URIs unchanged."""
    return uri if "://" in uri else os.path.abspath(uri)


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """URI -> (filesystem, path inside it)."""
    if "://" in uri:
        try:
            return pafs.FileSystem.from_uri(uri)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as e:
            raise RaypipeError(f"cannot open storage URI '{uri}': {e}") from None
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *[p.strip("/") for p in parts]])


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def makedirs(uri: str) -> None:
    fs, path = resolve(uri)
    fs.create_dir(path, recursive=True)


def remove_tree(uri: str) -> None:
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


def list_files(uri: str, suffix: str = "") -> list[str]:
    """Files directly under `uri` whose names end with `suffix`, sorted, as URIs."""
    fs, path = resolve(uri)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    names = sorted(i.base_name for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(suffix))
    return [join(uri, n) for n in names if not n.startswith(".tmp-")]


def write_bytes(uri: str, data: bytes) -> None:
    fs, path = resolve(uri)
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{parent}/.tmp-{uuid.uuid4().hex}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:  # a failed write leaves neither the target nor a stray temporary file
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise
    else:
        with fs.open_output_stream(path) as f:
            f.write(data)


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        raise RaypipeError(f"file '{uri}' does not exist") from None


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, json.dumps(obj, indent=2, sort_keys=False, default=_json_default).encode())


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def write_table(uri: str, table: pa.Table) -> None:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    write_bytes(uri, sink.getvalue())


def read_table(uri: str, columns: list[str] | None = None) -> pa.Table:
    fs, path = resolve(uri)
    try:
        return pq.read_table(path, filesystem=fs, columns=columns)
    except FileNotFoundError:
        raise RaypipeError(f"Parquet data '{uri}' does not exist") from None


def save_torch(uri: str, obj: Any) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes(uri, buffer.getvalue())


def load_torch(uri: str) -> Any:
    """weights_only=True: a checkpoint holds tensors and plain containers and can never run code."""
    data = read_bytes(uri)
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, ... for bad files
        found = re.search(r"GLOBAL ([\w.]+)", str(e)) if "Weights only load failed" in str(e) else None
        if found:  # torch's own first line would suggest weights_only=False: never the advice here
            raise CheckpointError(
                f"checkpoint '{uri}' cannot be loaded safely: it holds the Python object '{found.group(1)}', and "
                "raypipe loads only tensors and plain containers (torch.load(weights_only=True)); re-save it with "
                "raypipe (model.pt) from a trusted copy"
            ) from None
        raise CheckpointError(f"checkpoint '{uri}' cannot be loaded safely: {str(e).splitlines()[0]}") from None


def file_digest(uri: str) -> str:
    return hashlib.sha256(read_bytes(uri)).hexdigest()


def fingerprint(obj: Any) -> str:
    """A stable hash of JSON-able settings."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=_json_default).encode()).hexdigest()[:16]


def read_manifest(stage_uri: str) -> dict[str, Any] | None:
    uri = join(stage_uri, MANIFEST)
    return read_json(uri) if exists(uri) else None


def write_manifest(stage_uri: str, manifest: dict[str, Any]) -> None:
    write_json(join(stage_uri, MANIFEST), manifest)
