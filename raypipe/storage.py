"""Run storage: local paths or any pyarrow filesystem URI (s3://, gs://), atomic writes, manifests.

Stages hand over through files under the run directory, never through live objects. A stage is
finished exactly when its ``_manifest.json`` exists and holds the fingerprint of the settings and
inputs that made it; the manifest is written last, so a crash leaves a stage that looks unfinished.
Every file is published atomically (local: write a temporary file, then rename; object stores: an
object appears only when its upload completes).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import re
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from raypipe.errors import CheckpointError, DamagedFileError, RaypipeError, StorageError

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


# What to do about an OS error while writing, by errno.
_WRITE_FIXES = {
    errno.ENOSPC: "no space left on the device; free some space or use another --out",
    errno.EDQUOT: "disk quota exceeded; free some space or use another --out",
    errno.EROFS: "the file system is read-only; use another --out",
    errno.EACCES: "permission denied; use a folder you can write to as --out",
    errno.EPERM: "permission denied; use a folder you can write to as --out",
    errno.ENOTDIR: "a part of the path is a file, not a folder; use another --out",
    errno.ENOENT: "a part of the path cannot be created; use another --out",
}


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def write_fix(code: int | None) -> str:
    """What to do about an OS error of this errno while writing under --out."""
    return _WRITE_FIXES.get(code or 0, "check that the output folder can be written")


@contextlib.contextmanager
def writing(uri: str) -> Iterator[None]:
    """OS errors while writing `uri` (no space, read-only, permissions, an object store refusing) become
    one StorageError naming the file and the fix: they are the environment's, never a bug."""
    try:
        yield
    except OSError as e:
        raise StorageError(f"cannot write '{uri}': {write_fix(e.errno)} ({_first_line(e)})") from None


def is_folder(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def makedirs(uri: str) -> None:
    fs, path = resolve(uri)
    with writing(uri):
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
    with writing(uri):
        _write_bytes(uri, data)


def _write_bytes(uri: str, data: bytes) -> None:
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
    except OSError as e:  # a folder, no permission, an object store refusing
        raise RaypipeError(f"file '{uri}' cannot be read ({_first_line(e)})") from None


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
    """A Parquet file the run wrote; one that is missing or unreadable is damaged (DamagedFileError)."""
    fs, path = resolve(uri)
    try:
        return pq.read_table(path, filesystem=fs, columns=columns)
    except FileNotFoundError:
        raise DamagedFileError(uri, "missing") from None
    except (OSError, pa.ArrowException) as e:
        raise DamagedFileError(uri, _first_line(e)) from None


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
        if "Weights only load failed" in str(e):  # no code in it: not a checkpoint, or cut short
            raise CheckpointError(
                f"checkpoint '{uri}' is not a torch checkpoint, or is damaged (cannot be unpickled as weights); "
                "use the model.pt that raypipe wrote"
            ) from None
        raise CheckpointError(f"checkpoint '{uri}' cannot be loaded: {_first_line(e)}") from None


def file_digest(uri: str) -> str:
    return hashlib.sha256(read_bytes(uri)).hexdigest()


def fingerprint(obj: Any) -> str:
    """A stable hash of JSON-able settings."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=_json_default).encode()).hexdigest()[:16]


def read_manifest(stage_uri: str) -> dict[str, Any] | None:
    """The stage's manifest, or None when the stage is unfinished: no manifest, or one that cannot be
    read as a manifest (damaged, cut short, edited by hand)."""
    found = read_json_or_none(join(stage_uri, MANIFEST))
    if not isinstance(found, dict) or not isinstance(found.get("fingerprint"), str) or "summary" not in found:
        return None
    return found


def read_json_or_none(uri: str) -> Any:
    """The JSON in `uri`, or None when it is missing or not valid JSON."""
    if not exists(uri):
        return None
    try:
        return read_json(uri)
    except (ValueError, RaypipeError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None


def write_manifest(stage_uri: str, manifest: dict[str, Any]) -> None:
    write_json(join(stage_uri, MANIFEST), manifest)


# ---------------------------------------------------------------------------------------------
# What a stage wrote, and whether it is still there as written.


def describe_outputs(stage_uri: str, untracked: tuple[str, ...] = ()) -> dict[str, dict[str, int]]:
    """Every file under `stage_uri` (relative path -> {"bytes"}, plus {"rows"} for Parquet), without the
    run's own records (names starting with ``_``), temporaries and the folders named in `untracked`."""
    fs, root = resolve(stage_uri)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        return {}
    out: dict[str, dict[str, int]] = {}
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        rel = info.path[len(root) :].lstrip("/")
        if info.type != pafs.FileType.File or rel.split("/")[0] in untracked:
            continue
        if info.base_name.startswith(("_", ".tmp-")):
            continue
        out[rel] = {"bytes": int(info.size)}
        if rel.endswith(".parquet"):
            with contextlib.suppress(DamagedFileError):  # not Parquet after all: known by its size alone
                out[rel]["rows"] = _parquet_rows(fs, info.path, join(stage_uri, rel))
    return dict(sorted(out.items()))


def _parquet_rows(fs: pafs.FileSystem, path: str, uri: str) -> int:
    try:
        with fs.open_input_file(path) as f:
            return int(pq.read_metadata(f).num_rows)
    except (OSError, pa.ArrowException) as e:
        raise DamagedFileError(uri, _first_line(e)) from None


def check_outputs(stage_uri: str, recorded: dict[str, dict[str, int]]) -> str | None:
    """None when every file of `recorded` (from `describe_outputs`) is there with its size and row count;
    else what is wrong with the first one that is not."""
    fs, root = resolve(stage_uri)
    infos = fs.get_file_info([f"{root}/{rel}" for rel in recorded])
    for (rel, want), info in zip(recorded.items(), infos, strict=True):
        if info.type != pafs.FileType.File:
            return f"'{rel}' is missing"
        if info.size != want["bytes"]:
            return f"'{rel}' has {info.size} bytes, {want['bytes']} when the stage finished"
        if "rows" in want:
            try:
                rows = _parquet_rows(fs, info.path, join(stage_uri, rel))
            except DamagedFileError as e:
                return f"'{rel}' cannot be read ({e.reason})"
            if rows != want["rows"]:
                return f"'{rel}' has {rows} rows, {want['rows']} when the stage finished"
    return None


# ---------------------------------------------------------------------------------------------
# What input files hold, for a stage's fingerprint.

# Local input files are hashed up to this many bytes in all (SHA-256 reads ~0.5 GB/s, so at most about half a
# second per run); the rest, and objects in object stores (which would have to be downloaded), are known by
# size, modification time and the store's version / ETag.
HASH_MAX_BYTES = 256 * 2**20
_VERSION_KEYS = {"etag", "versionid", "generation"}


def files_fingerprint(uris: list[str]) -> list[dict[str, Any]]:
    """For each existing file: its name, size and SHA-256 (local files, within HASH_MAX_BYTES in all: the
    content itself, wherever the file lives), else its URI, size, modification time and the object store's
    version / ETag. Missing files are left out."""
    infos = [(uri, *resolve(uri)) for uri in uris]
    infos = [(uri, fs, fs.get_file_info(path)) for uri, fs, path in infos]
    infos = [(uri, fs, info) for uri, fs, info in infos if info.type == pafs.FileType.File]
    with ThreadPoolExecutor(max_workers=16) as pool:  # an object store answers one request per object
        versions = list(pool.map(lambda item: _object_version(item[1], item[2]), infos))
    out, hashed = [], 0
    for (uri, fs, info), version in zip(infos, versions, strict=True):
        if isinstance(fs, pafs.LocalFileSystem) and hashed + info.size <= HASH_MAX_BYTES:
            hashed += info.size
            out.append({"name": info.base_name, "bytes": int(info.size), "sha256": _local_digest(info.path)})
        else:
            out.append({"uri": uri, "bytes": int(info.size), "mtime_ns": info.mtime_ns, **version})
    return out


def _object_version(fs: pafs.FileSystem, info: pafs.FileInfo) -> dict[str, str]:
    """The version / ETag an object store gives an object ({} for local files)."""
    if isinstance(fs, pafs.LocalFileSystem):
        return {}
    with fs.open_input_stream(info.path) as f:
        meta = f.metadata() or {}
    found = {}
    for key, value in meta.items():
        name = (key.decode() if isinstance(key, bytes) else str(key)).lower().replace("-", "").replace("_", "")
        if name in _VERSION_KEYS:
            found[name] = value.decode() if isinstance(value, bytes) else str(value)
    return found


def _local_digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()
