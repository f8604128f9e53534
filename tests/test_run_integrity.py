"""Nothing stale or damaged is used silently, through the real CLI (in this process, local executor).

A finished tiny run is made once per module; each test copies it, damages or changes something the way a
user or a failing disk would, reruns `raypipe run` and checks what is recomputed, what is kept, and that the
report never describes other data or settings. Unit checks of the pieces (manifest file lists, input
fingerprints, unreadable manifests, wrapped errors) come first.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raypipe import storage
from raypipe.cli import main
from raypipe.errors import DamagedFileError, DataError, RaypipeError, user_error

pytestmark = pytest.mark.usefixtures("one_thread")

RUN = [
    "run.device=cpu",
    "data.max_train_samples=200",
    "data.shard_rows=100",
    "run.routes=[f_ft]",
    "initial.epochs=2",
    "f_ft.epochs=1",
]
STAGES = ["data", "initial", "attribution", "partition", "prune", "f_ft"]


# ---------------------------------------------------------------------------------------------
# The pieces.


def test_outputs_are_listed_with_sizes_and_rows_and_checked(tmp_path):
    stage = tmp_path / "stage"
    stage.mkdir()
    pq.write_table(pa.table({"a": [1, 2, 3]}), stage / "part-00000.parquet")
    (stage / "model.pt").write_bytes(b"weights")
    (stage / "_manifest.json").write_text("{}")  # the run's own records are not outputs
    (stage / ".tmp-123").write_bytes(b"half")
    (stage / "ray_train").mkdir()
    (stage / "ray_train" / "state.json").write_text("{}")
    outputs = storage.describe_outputs(str(stage), ("ray_train",))
    size = (stage / "part-00000.parquet").stat().st_size
    assert outputs == {"model.pt": {"bytes": 7}, "part-00000.parquet": {"bytes": size, "rows": 3}}
    assert storage.check_outputs(str(stage), outputs) is None

    (stage / "model.pt").write_bytes(b"weight")
    assert storage.check_outputs(str(stage), outputs) == "'model.pt' has 6 bytes, 7 when the stage finished"
    (stage / "model.pt").write_bytes(b"weights")
    pq.write_table(pa.table({"a": [9, 9, 9, 9]}), stage / "part-00000.parquet")
    same_size = {"bytes": (stage / "part-00000.parquet").stat().st_size, "rows": 3}  # as if rewritten in place
    problem = storage.check_outputs(str(stage), {**outputs, "part-00000.parquet": same_size})
    assert problem == "'part-00000.parquet' has 4 rows, 3 when the stage finished"
    (stage / "model.pt").unlink()
    assert storage.check_outputs(str(stage), outputs) == "'model.pt' is missing"


def test_input_fingerprint_follows_the_content(tmp_path):
    path = tmp_path / "t.bin"
    path.write_bytes(b"abcd")
    first = storage.files_fingerprint([str(path), str(tmp_path / "missing")])
    assert first == [{"name": "t.bin", "bytes": 4, "sha256": first[0]["sha256"]}]  # a missing file is left out
    stat = path.stat()
    path.write_bytes(b"abce")  # same size, same modification time: only the content tells
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert storage.files_fingerprint([str(path)]) != first


def test_object_store_files_are_known_by_their_version():
    """What pyarrow's S3 / GCS streams report (ETag, VersionId, ...) is kept; other metadata is not."""

    class Stream:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def metadata(self):
            return {b"ETag": b'"4c6a76"', b"VersionId": b"v7", b"Content-Type": b"application/octet-stream"}

    class ObjectStore:
        def open_input_stream(self, path):
            return Stream()

    info = type("Info", (), {"path": "bucket/t.parquet"})()
    assert storage._object_version(ObjectStore(), info) == {"etag": '"4c6a76"', "versionid": "v7"}


def test_unreadable_manifest_is_unfinished(tmp_path):
    for text in ("{not json", '["a list"]', '{"summary": {}}', "\udcff"):
        (tmp_path / "_manifest.json").write_bytes(text.encode("utf-8", "surrogateescape"))
        assert storage.read_manifest(str(tmp_path)) is None, text
    (tmp_path / "_manifest.json").write_text('{"fingerprint": "f", "summary": {}}')
    assert storage.read_manifest(str(tmp_path)) == {"fingerprint": "f", "summary": {}}


def test_a_damaged_file_is_named_when_read(tmp_path):
    cut = tmp_path / "cut.parquet"
    pq.write_table(pa.table({"a": np.arange(100)}), cut)
    cut.write_bytes(cut.read_bytes()[:-30])
    with pytest.raises(DamagedFileError, match=r"cut.parquet' is damaged \("):
        storage.read_table(str(cut))
    with pytest.raises(DamagedFileError, match="is damaged [(]missing[)]"):
        storage.read_table(str(tmp_path / "gone.parquet"))


def test_user_error_is_found_inside_wrappers():
    cause = DataError("the one line")

    class TaskError(RuntimeError):  # a remote task's error: the original as `cause`
        def __init__(self):
            super().__init__("Traceback ...\n  many lines")
            self.cause = cause

    class GroupError(RuntimeError):  # a worker group's: per-rank failures
        worker_failures = {0: RuntimeError("other"), 1: TaskError()}

    assert user_error(GroupError()) is cause
    try:
        raise RuntimeError("outer") from TaskError()
    except RuntimeError as e:
        assert user_error(e) is cause
    assert user_error(ValueError("a bug")) is None


# ---------------------------------------------------------------------------------------------
# Through the CLI.


def _run(out: Path, capsys, *extra: str) -> tuple[int, list[str], str]:
    code = main(["run", "--out", str(out), *RUN, *extra])
    captured = capsys.readouterr()
    return code, captured.out.splitlines(), captured.err


def _skipped(lines: list[str]) -> list[str]:
    return [line.split("]")[0][1:] for line in lines if line.endswith("up to date, skipped")]


def _computed(lines: list[str]) -> list[str]:
    return [line.split("]")[0][1:] for line in lines if "] done in" in line]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["run", "--out", str(out), *RUN]) == 0
    return out


@pytest.fixture
def run_copy(finished, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


def test_truncated_output_is_computed_again_with_every_stage_after_it(run_copy, capsys):
    shard = run_copy / "partition" / "split" / "part-00000.parquet"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    code, lines, err = _run(run_copy, capsys, "f_ft.epochs=2")  # the case: another setting downstream
    assert code == 0, err
    assert _skipped(lines) == ["data", "initial", "attribution"]
    assert _computed(lines) == ["partition", "prune", "f_ft"]
    assert any(
        "[partition] 'split/part-00000.parquet' has" in line and "computing the stage again" in line for line in lines
    )
    manifest = storage.read_manifest(str(run_copy / "partition"))
    assert manifest["revision"] == 1 and pq.read_metadata(shard).num_rows == 100
    # The next plain rerun finds everything intact and recomputes nothing.
    code, lines, _ = _run(run_copy, capsys, "f_ft.epochs=2")
    assert code == 0 and _skipped(lines) == STAGES


def test_unreadable_manifest_reruns_its_stage_and_every_stage_after_it(run_copy, capsys):
    (run_copy / "prune" / "_manifest.json").write_text('{"fingerprint": "abc", "summ')
    code, lines, err = _run(run_copy, capsys)
    assert code == 0, err
    assert _skipped(lines) == ["data", "initial", "attribution", "partition"]
    assert _computed(lines) == ["prune", "f_ft"]  # f_ft was trained on the old prune's model: trained again
    assert any("_manifest.json cannot be read" in line for line in lines)


def test_missing_model_is_trained_again(run_copy, capsys):
    (run_copy / "initial" / "model.pt").unlink()
    code, lines, err = _run(run_copy, capsys)
    assert code == 0, err
    assert _skipped(lines) == ["data"]
    assert _computed(lines) == STAGES[1:]


def _table(path: Path, labels: np.ndarray) -> None:
    images = np.random.default_rng(0).random((len(labels), 6)).astype(np.float32)
    # uncompressed, no dictionary: the file's size depends on the row count alone, never on the values
    pq.write_table(pa.table({"image": list(images), "label": labels}), path, compression="none", use_dictionary=False)


def test_input_rewritten_at_the_same_path_is_new_data(tmp_path, capsys):
    table = tmp_path / "mine.parquet"
    labels = np.arange(120) % 3
    _table(table, labels)
    out = tmp_path / "run"
    parquet = ["data.source=parquet", f"data.path={table}", "detection.k=5"]
    code, _, err = _run(out, capsys, *parquet)
    assert code == 0, err
    before = storage.read_manifest(str(out / "data"))["settings"]["files"]

    size = table.stat().st_size
    _table(table, np.roll(labels, 1))  # other labels, same images, same path, same number of rows
    assert table.stat().st_size == size  # only the content tells
    code, lines, err = _run(out, capsys, *parquet)
    assert code == 0, err
    assert _skipped(lines) == [] and _computed(lines) == STAGES
    after = storage.read_manifest(str(out / "data"))["settings"]["files"]
    assert [f["bytes"] for f in after] == [f["bytes"] for f in before] and after != before
    code, lines, _ = _run(out, capsys, *parquet)
    assert code == 0 and _skipped(lines) == STAGES


def test_report_of_earlier_results_is_removed_before_a_rerun(run_copy, capsys):
    assert (run_copy / "report.json").exists() and list((run_copy / "plots").glob("*.png"))
    code, lines, err = _run(run_copy, capsys, "partition.min_clean_fraction=0.99")
    assert code == 2 and "partition.min_clean_fraction=0.99" in err
    assert not (run_copy / "report.json").exists() and not (run_copy / "report.md").exists()
    assert not list((run_copy / "plots").glob("*.png"))
    assert "min_clean_fraction: 0.99" in (run_copy / "config.yaml").read_text()  # what the folder holds now
    # Settings that change nothing a stage computes keep the report.
    code, _, err = _run(run_copy, capsys)
    assert code == 0, err
    code, lines, _ = _run(run_copy, capsys, "run.executor=local")
    assert code == 0 and _computed(lines) == [] and (run_copy / "report.json").exists()


def test_damaged_file_found_by_a_later_stage_makes_its_stage_unfinished(run_copy, capsys):
    """A damage no file list shows (a manifest written before they were listed, a file rewritten in place)
    is found when the file is read: one line, and the stage that wrote it is unfinished, so the next plain
    rerun computes it again."""
    manifest = json.loads((run_copy / "partition" / "_manifest.json").read_text())
    del manifest["outputs"]
    (run_copy / "partition" / "_manifest.json").write_text(json.dumps(manifest))
    shard = run_copy / "partition" / "split" / "part-00001.parquet"
    shard.write_bytes(shard.read_bytes()[:-40] + b"\0" * 40)
    code, lines, err = _run(run_copy, capsys, "f_ft.epochs=2")
    assert code == 2
    assert err.count("\n") == 1 and "part-00001.parquet' is damaged" in err, err
    assert "stage 'partition' is now unfinished: rerun the same command" in err
    assert storage.read_manifest(str(run_copy / "partition")) is None
    code, lines, err = _run(run_copy, capsys, "f_ft.epochs=2")
    assert code == 0, err
    assert _computed(lines) == ["partition", "prune", "f_ft"]


def test_shared_stage_that_is_damaged_is_not_recomputed_by_a_reader(run_copy):
    from raypipe.config import load_config
    from raypipe.executors import LocalExecutor
    from raypipe.layout import RunLayout
    from raypipe.pipeline import STAGES as TABLE
    from raypipe.pipeline import Run

    (run_copy / "attribution" / "samples" / "part-00000.parquet").unlink()
    trial = RunLayout(
        str(run_copy.parent / "trial"), {s: str(run_copy / s) for s in ("data", "initial", "attribution")}
    )
    run = Run(load_config(None, RUN), trial, LocalExecutor(lambda *_: None), lambda *_: None)
    run.run_stage(TABLE[0])
    run.run_stage(TABLE[1])
    with pytest.raises(RaypipeError, match="shared folder .* is damaged .'samples/part-00000.parquet' is missing"):
        run.run_stage(TABLE[2])
    assert storage.read_manifest(str(run_copy / "attribution")) is not None  # the owner's record is kept


@pytest.mark.ray
def test_damaged_file_found_in_a_ray_task_is_the_same_one_line(run_copy, capsys, ray_cluster):
    """The prune stage reads the partition's shards in Ray tasks: the DamagedFileError raised there reaches the
    driver as itself (not as a RayTaskError with a remote traceback), with the same line and the same repair."""
    manifest = json.loads((run_copy / "partition" / "_manifest.json").read_text())
    del manifest["outputs"]
    (run_copy / "partition" / "_manifest.json").write_text(json.dumps(manifest))
    shard = run_copy / "partition" / "split" / "part-00000.parquet"
    shard.write_bytes(shard.read_bytes()[:-40] + b"\0" * 40)
    code, lines, err = _run(run_copy, capsys, "prune.fraction=0.2", "run.executor=ray")
    assert code == 2
    assert err.count("\n") == 1 and "part-00000.parquet' is damaged" in err and "Traceback" not in err, err
    assert "stage 'partition' is now unfinished" in err
    assert storage.read_manifest(str(run_copy / "partition")) is None
