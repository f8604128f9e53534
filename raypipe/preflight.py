"""The checks a run passes before any work, and the checks against the data once the data is known.

`preflight` runs before the run folder is even created (`raypipe run`, `raypipe sweep`, `raypipe.run`):
settings that contradict each other or do nothing, settings that leave nothing to train or prune, the
device, the output folder (creatable, a folder, writable, with room, not someone else's files), inputs
that lie where the run would clear them, and a given checkpoint. `check_against_data` runs as soon as the
data stage is finished and before any stage after it (`raypipe.pipeline.Run`): sizes against the data,
and whether the model takes the data's samples. Each failure is one ConfigError / StorageError line
naming the key or path and the fix.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any

import torch

from raypipe import storage
from raypipe.config import Config, DataConfig, ModelConfig
from raypipe.core.mixture import MIN_FIT_ROWS
from raypipe.core.models import build_model, check_signature, saved_signature
from raypipe.core.pruning import check_prune_fraction
from raypipe.data.noise import check_pairs, injected_noise
from raypipe.data.parquet_source import check_columns
from raypipe.errors import ConfigError, RaypipeError, StorageError

# The least free space a run starts with (the default digits run writes 2.4 MiB; larger data sets more).
MIN_FREE_BYTES = 64 * 2**20
# The sources torchvision can fetch (data.download).
DOWNLOADABLE = ("mnist", "fashion-mnist", "cifar10")


def preflight(config: Config, out: str, stage_names: tuple[str, ...] = (), sweep: bool = False) -> None:
    """Every check that needs neither the data nor any work; writes nothing. `stage_names`: the stage
    folders a run may clear under `out`; `sweep`: `config` is a sweep's (its `sweep:` section is checked too)."""
    check_settings(config, sweep)
    check_device(config.run.device)
    if config.run.executor == "ray" or sweep:  # a sweep always runs on Ray
        check_reachable(config.ray.address or os.environ.get("RAY_ADDRESS"))
    check_output_folder(out, stage_names)
    check_test_table(config.data.test_path)
    check_inputs_outside(config, out, stage_names)
    if config.model.checkpoint is not None:
        check_given_checkpoint(config)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ---------------------------------------------------------------------------------------------
# Settings.


def check_settings(config: Config, sweep: bool = False) -> None:
    """Settings that contradict each other, do nothing for this source, or leave nothing to prune."""
    data, det = config.data, config.detection
    if data.source != "parquet":
        defaults = DataConfig()
        for key in ("shape", "num_classes", "image_column", "label_column"):
            if getattr(data, key) != getattr(defaults, key):
                raise ConfigError(
                    f"config key 'data.{key}': used only by data.source=parquet, and this run reads "
                    f"'{data.source}'; unset it (or set data.source=parquet)"
                )
    else:
        check_columns(data)
    if data.source == "digits" and data.path is not None:
        raise ConfigError(
            "config key 'data.path': data.source=digits is built in and reads no files; unset data.path, or set "
            "data.source to the kind of files it points at"
        )
    if data.download and data.source not in DOWNLOADABLE:
        raise ConfigError(
            f"config key 'data.download': '{data.source}' cannot be downloaded (only {list(DOWNLOADABLE)}); "
            "unset data.download"
        )
    check_pairs(injected_noise(config.noise, data.source), data.source)
    key, fractions = (
        ("sweep.prune_fraction", config.sweep.prune_fraction) if sweep else ("prune.fraction", [config.prune.fraction])
    )
    for fraction in fractions:
        check_prune_fraction(fraction, config.model.probe_width, key)
    if det.signal == "trajectory" and (config.model.checkpoint is not None or det.aum_epochs == 0):
        raise ConfigError(
            "config key 'detection.signal': trajectory needs the training trajectory, recorded only when raypipe "
            "trains the initial model (no model.checkpoint) with detection.aum_epochs > 0; use knn or auto"
        )
    if det.signal in ("knn", "auto") and det.k >= det.max_reference:
        raise ConfigError(
            f"config key 'detection.k': {det.k} neighbours but the reference set holds at most "
            f"detection.max_reference={det.max_reference} samples; lower detection.k or raise detection.max_reference"
        )


def check_device(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "config key 'run.device': cuda, but torch finds no usable GPU on this machine "
            "(torch.cuda.is_available() is False); use run.device=auto (a GPU when there is one) or cpu"
        )


def unreachable(address: str | None, why: str) -> RaypipeError:
    return RaypipeError(
        f"cannot connect to the Ray cluster at '{address}' ({why}); check ray.address / RAY_ADDRESS, or unset both "
        "to start a local Ray"
    )


def check_reachable(address: str | None, timeout_s: float = 10.0) -> None:
    """A cluster address host:port that accepts no connection fails here at once (ray.init would retry it
    for minutes). `auto`, `local` and client URIs (ray://) are left to Ray."""
    if not address or address in ("auto", "local") or "://" in address or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as e:
        raise unreachable(address, getattr(e, "strerror", None) or str(e)) from None


# ---------------------------------------------------------------------------------------------
# The output folder and the inputs.


def check_output_folder(out: str, stage_names: tuple[str, ...] = ()) -> None:
    """`out` can be created (or is a folder), can be written, has MIN_FREE_BYTES free, and holds no folder
    of a stage's name that raypipe did not write (a rerun clears stage folders: never someone's files)."""
    if not out.strip():
        raise StorageError("--out is empty; name the run's folder, e.g. --out runs/digits")
    if "://" in out:
        fs, path = storage.resolve(out)  # an unknown scheme is one line already
        try:
            info = fs.get_file_info(path)
        except OSError as e:
            raise StorageError(
                f"--out '{out}' cannot be reached ({_first_line(e)}); check the URI and the credentials"
            ) from None
        if info.type == storage.pafs.FileType.File:
            raise StorageError(f"--out '{out}' is a file, not a folder; use another --out")
        return
    existing = Path(out).absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise StorageError(f"--out '{out}': '{existing}' is a file, not a folder; use another --out")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".raypipe-probe-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        fix = storage.write_fix(e.errno)
        raise StorageError(f"--out '{out}': cannot create files in '{existing}': {fix} ({_first_line(e)})") from None
    free = shutil.disk_usage(existing).free
    if free < MIN_FREE_BYTES:
        raise StorageError(
            f"--out '{out}': {free / 2**20:.1f} MiB free on its disk, and a run needs at least "
            f"{MIN_FREE_BYTES // 2**20} MiB; free some space or use another --out"
        )
    for name in stage_names:
        folder = Path(out) / name
        if folder.is_dir() and not any((folder / f).exists() for f in ("_manifest.json", "_pending.json")):
            raise StorageError(
                f"--out '{out}' holds a folder '{name}' that raypipe did not write (no _manifest.json or "
                f"_pending.json in it), and a run replaces its stage folders; move it, or use another --out"
            )


def check_test_table(path: str | None) -> None:
    """A local data.test_path exists (an object-store one is read, and named if missing, by the data stage)."""
    if path is not None and "://" not in path and not os.path.exists(os.path.expanduser(path)):
        raise ConfigError(
            f"config key 'data.test_path': '{path}' does not exist; point it at the Parquet file or folder of your "
            "test table, or unset it to cut a test split from data.path"
        )


def check_inputs_outside(config: Config, out: str, stage_names: tuple[str, ...]) -> None:
    """No input may lie inside a stage folder of `out`: a rerun clears those folders."""
    if "://" in out:
        return
    inputs = {"data.path": config.data.path, "data.test_path": config.data.test_path}
    inputs["model.checkpoint"] = config.model.checkpoint
    sweep = getattr(config, "sweep", None)
    if sweep is not None:
        inputs["sweep.trusted_path"] = sweep.trusted_path
    for key, path in inputs.items():
        if path is None or "://" in path:
            continue
        where = os.path.abspath(os.path.expanduser(path))
        for name in stage_names:
            folder = os.path.abspath(os.path.join(out, name))
            if where == folder or where.startswith(folder + os.sep):
                raise ConfigError(
                    f"config key '{key}': '{path}' lies inside '{folder}', a stage folder of --out that a run "
                    "clears; copy it elsewhere, or use another --out"
                )


def check_given_checkpoint(cfg: Config) -> None:
    """`model.checkpoint` exists, loads safely (weights only), has the configured architecture, probe width
    and hidden width, and finite weights. The input shape and class count are checked by `initial` once the
    data is known."""
    uri = cfg.model.checkpoint
    if not storage.exists(uri):
        raise ConfigError(
            f"config key 'model.checkpoint': '{uri}' does not exist; point it at a raypipe checkpoint (model.pt) "
            "or unset it to train the initial model"
        )
    if storage.is_folder(uri):
        raise ConfigError(
            f"config key 'model.checkpoint': '{uri}' is a folder; point it at a checkpoint file (model.pt)"
        )
    blob = storage.load_torch(uri)
    saved = saved_signature(blob, uri)
    expect = {**saved, **{k: getattr(cfg.model, k) for k in ("name", "probe_width", "hidden_width")}}
    check_signature(saved, expect, uri)
    state = blob["model_state"]
    bad = [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and not v.isfinite().all()]
    if bad:
        raise ConfigError(
            f"config key 'model.checkpoint': '{uri}' has NaN or infinite weights (in {bad[0]}); its training diverged: "
            "use a checkpoint of a model that trained well"
        )


# ---------------------------------------------------------------------------------------------
# Against the data, before the first stage after it.


def check_against_data(config: Config, data: dict[str, Any]) -> None:
    """`data` is the data stage's summary: sizes the detection needs, and a model that takes the samples."""
    n_train, classes, shape = data["rows"]["train"], data["num_classes"], tuple(data["sample_shape"])
    if n_train < MIN_FIT_ROWS:
        cap = config.data.max_train_samples
        fix = f"raise data.max_train_samples (now {cap})" if cap is not None else "add data"
        raise ConfigError(
            f"config key 'data.max_train_samples': the training split holds {n_train} samples, and the partition's "
            f"mixture needs at least {MIN_FIT_ROWS}; {fix}"
        )
    det = config.detection
    reference = min(n_train, det.max_reference)
    if det.signal in ("knn", "auto") and det.k >= reference:
        raise ConfigError(
            f"config key 'detection.k': {det.k} neighbours, but the kNN reference set holds {reference} training "
            f"samples; use detection.k={max(1, reference // 4)} or fewer"
        )
    check_model_takes(config.model, shape, classes)


def check_model_takes(cfg: ModelConfig, shape: tuple[int, ...], classes: int) -> None:
    """Build the configured model and run two zero samples of the data's shape through it."""
    key = "model.factory" if cfg.name == "user" else "model.name"
    try:
        model = build_model(cfg, shape, classes).eval()
        with torch.no_grad():
            model(torch.zeros(2, *shape))
    except RaypipeError:
        raise
    except Exception as e:  # whatever the model's code raises for a shape it cannot take
        raise ConfigError(
            f"config key '{key}': model '{cfg.name}' cannot take this data's samples (shape {list(shape)}, "
            f"{classes} classes): {_first_line(e)}; use another model"
        ) from None
