"""Bad input, end to end through the real CLI: every row of the README's bad-input table.

Each case runs `raypipe run` (in-process through `raypipe.cli.main`, or as `python -m raypipe.cli` for a few)
on a tiny broken input and checks what a user sees: exit status 2, exactly one `error: ...` line on stderr
naming the file or config key, no traceback, and nothing marked finished: no `_manifest.json` for the stage
that failed (stages before it may have finished legitimately; where the input can be checked before any work,
the run directory is not even created), and no report.
"""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from raypipe.cli import main
from raypipe.config import ModelConfig, RayConfig
from raypipe.core.models import build_model, model_signature
from raypipe.errors import RaypipeError
from raypipe.training.checkpoint import save_model

# Tiny files in the real formats, shared with the loader unit tests.
from test_data import make_cifar_raw, make_idx_dir, write_cifar_binary, write_cifar_python, write_idx

REPO = Path(__file__).resolve().parents[1]
QUICK = ["run.device=cpu", "data.max_train_samples=200", "data.shard_rows=100", "run.routes=[f_ft]", "f_ft.epochs=1"]
DIGITS = ((1, 8, 8), 10)  # sample shape and classes of the default source


@dataclass
class Case:
    overrides: list[str]
    needles: list[str]  # each must appear in the error line
    stage: str | None  # the stage that fails; None: refused before the run directory is written
    out: str | None = None  # --out, when the case is about it
    config_file: str | None = None
    after: list[Callable[[], None]] = field(default_factory=list)  # extra checks
    started: bool = True  # False: refused against the data before `stage` began (its folder is never made)


def _parquet(path: Path, columns: dict, schema: pa.Schema | None = None) -> Path:
    pq.write_table(pa.table(columns, schema=schema) if schema is None else schema.empty_table(), path)
    return path


def _image_rows(n: int, length: int = 4, seed: int = 0) -> list[list[float]]:
    return np.random.default_rng(seed).random((n, length)).round(3).tolist()


def _checkpoint(
    path: Path, cfg: ModelConfig, shape=DIGITS[0], classes=DIGITS[1], zero: bool = False, nan: bool = False
) -> str:
    torch.manual_seed(0)
    model = build_model(cfg, shape, classes)
    with torch.no_grad():
        if zero:  # every output the same: every sample gets the same attribution
            for p in model.parameters():
                p.zero_()
        if nan:  # what a diverged training leaves
            model.fc2.weight[0, 0] = float("nan")
    save_model(str(path), model, model_signature(cfg, shape, classes))
    return str(path)


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ---------------------------------------------------------------------------------------------
# The table's rows. Each builder writes its broken input under `d` and returns the case.


def missing_data_dir(d: Path) -> Case:
    return Case(["data.source=mnist", f"data.path={d / 'nowhere'}"], ["train-images-idx3-ubyte", "nowhere"], "data")


def missing_parquet_uri(d: Path) -> Case:
    uri = f"file://{d / 'no_such_table.parquet'}"
    return Case(["data.source=parquet", f"data.path={uri}"], ["no_such_table.parquet' does not exist"], "data")


def unknown_uri_scheme(d: Path) -> Case:
    return Case(["data.source=parquet", "data.path=nosuch://bucket/t.parquet"], ["nosuch://bucket/t.parquet"], "data")


def bad_out_uri(d: Path) -> Case:
    return Case([], ["nosuch://bucket/run"], None, out="nosuch://bucket/run")


def missing_checkpoint(d: Path) -> Case:
    return Case([f"model.checkpoint={d / 'no_model.pt'}"], ["'model.checkpoint'", "no_model.pt"], None)


def truncated_idx(d: Path) -> Case:
    make_idx_dir(d)
    images = d / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-100])
    return Case(["data.source=mnist", f"data.path={d}"], ["train-images-idx3-ubyte' is truncated"], "data")


def corrupt_idx_gzip(d: Path) -> Case:
    make_idx_dir(d, gz=True)
    labels = d / "t10k-labels-idx1-ubyte.gz"
    labels.write_bytes(labels.read_bytes()[:20])
    return Case(["data.source=mnist", f"data.path={d}"], ["t10k-labels-idx1-ubyte.gz' cannot be read"], "data")


def truncated_cifar(d: Path) -> Case:
    write_cifar_binary(d, make_cifar_raw())
    batch = d / "data_batch_2.bin"
    batch.write_bytes(batch.read_bytes()[:-10])
    return Case(["data.source=cifar10", f"data.path={d}"], ["data_batch_2.bin' is truncated"], "data")


def corrupt_cifar_pickle(d: Path) -> Case:
    write_cifar_python(d, make_cifar_raw())
    (d / "data_batch_4").write_bytes(b"\x80\x04garbage")
    return Case(["data.source=cifar10", f"data.path={d}"], ["data_batch_4' is not a readable CIFAR batch"], "data")


def malicious_cifar_pickle(d: Path) -> Case:
    write_cifar_python(d, make_cifar_raw())
    marker = d / "pwned"
    with open(d / "data_batch_3", "wb") as f:
        pickle.dump({b"data": _Exploit(marker), b"labels": [0]}, f)

    def not_run() -> None:
        assert not marker.exists(), "the pickle's code ran"

    needles = ["data_batch_3' was refused", "system' is not allowed"]
    return Case(["data.source=cifar10", f"data.path={d}"], needles, "data", after=[not_run])


def corrupt_parquet(d: Path) -> Case:
    (d / "junk.parquet").write_bytes(b"PAR1 this is not parquet")
    return Case(["data.source=parquet", f"data.path={d / 'junk.parquet'}"], ["junk.parquet", "cannot read"], "data")


def truncated_parquet(d: Path) -> Case:
    path = _parquet(d / "cut.parquet", {"image": _image_rows(64), "label": [i % 2 for i in range(64)]})
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return Case(["data.source=parquet", f"data.path={path}"], ["cut.parquet", "cannot read"], "data")


def wrong_idx_image_shape(d: Path) -> Case:
    make_idx_dir(d)
    write_idx(d / "train-images-idx3-ubyte", np.zeros((40, 32, 32), dtype=np.uint8))
    needles = [str(d), "shape (1, 32, 32), expected (1, 28, 28)"]
    return Case(["data.source=mnist", f"data.path={d}"], needles, "data")


def wrong_cifar_dtype(d: Path) -> Case:
    raw = make_cifar_raw()
    raw["data_batch_1"] = (raw["data_batch_1"][0].astype(np.float64), raw["data_batch_1"][1])
    write_cifar_python(d, raw)
    needles = ["data_batch_1'", "float64", "expected a uint8 array [n, 3072]"]
    return Case(["data.source=cifar10", f"data.path={d}"], needles, "data")


def wrong_parquet_dtype(d: Path) -> Case:
    path = _parquet(d / "strings.parquet", {"image": [["a", "b"]] * 8, "label": [0, 1] * 4})
    return Case(["data.source=parquet", f"data.path={path}"], ["strings.parquet", "column 'image'", "string"], "data")


def wrong_parquet_shape(d: Path) -> Case:
    path = _parquet(d / "flat.parquet", {"image": _image_rows(8, 5), "label": [0, 1] * 4})
    needles = ["flat.parquet", "data.shape [2, 2] holds 4 values", "has 5"]
    return Case(["data.source=parquet", f"data.path={path}", "data.shape=[2,2]"], needles, "data")


def labels_out_of_range(d: Path) -> Case:
    path = _parquet(d / "labels.parquet", {"image": _image_rows(12), "label": [0, 1, 2, 10] * 3})
    needles = ["labels.parquet", "label(s) outside [0, 10)", "e.g. 10"]
    return Case(["data.source=parquet", f"data.path={path}", "data.num_classes=10"], needles, "data")


def negative_idx_labels(d: Path) -> Case:
    make_idx_dir(d)
    write_idx(d / "t10k-labels-idx1-ubyte", np.full(12, 12, dtype=np.uint8))
    return Case(["data.source=fashion-mnist", f"data.path={d}"], [str(d), "outside [0, 10)", "e.g. 12"], "data")


def nan_values(d: Path) -> Case:
    rows = _image_rows(8)
    rows[3][1] = float("nan")
    rows[5][0] = float("inf")
    path = _parquet(d / "nan.parquet", {"image": rows, "label": [0, 1] * 4})
    return Case(["data.source=parquet", f"data.path={path}"], ["nan.parquet", "NaN or inf values in 2 sample"], "data")


def empty_table(d: Path) -> Case:
    schema = pa.schema([("image", pa.list_(pa.float32())), ("label", pa.int64())])
    path = _parquet(d / "empty.parquet", {}, schema)
    return Case(["data.source=parquet", f"data.path={path}"], ["empty.parquet' holds no rows"], "data")


def single_class(d: Path) -> Case:
    path = _parquet(d / "one.parquet", {"image": _image_rows(12), "label": [3] * 12})
    return Case(["data.source=parquet", f"data.path={path}"], ["one.parquet", "single class (3)"], "data")


def noise_rate_one(d: Path) -> Case:
    return Case(["noise.rate=1.0"], ["'noise.rate'", "outside [0, 1)"], None)


def noise_rate_negative(d: Path) -> Case:
    return Case(["noise.rate=-0.1"], ["'noise.rate'", "outside [0, 1)"], None)


def unknown_key_in_file(d: Path) -> Case:
    (d / "conf.yaml").write_text("partition:\n  tua: 0.3\n")
    return Case([], ["unknown config key 'partition.tua'"], None, config_file=str(d / "conf.yaml"))


def wrong_type(d: Path) -> Case:
    return Case(["data.shard_rows=many"], ["'data.shard_rows'", "expected an integer"], None)


def wrong_type_in_file(d: Path) -> Case:
    (d / "conf.yaml").write_text("ray:\n  use_gpu: 1\n")
    return Case([], ["'ray.use_gpu'", "got 1"], None, config_file=str(d / "conf.yaml"))


def checkpoint_other_architecture(d: Path) -> Case:
    uri = _checkpoint(d / "cnn.pt", ModelConfig(name="cnn_small"))
    return Case([f"model.checkpoint={uri}"], ["cnn.pt", "name='cnn_small'", "'mlp'", "model.name"], None)


def checkpoint_other_probe_width(d: Path) -> Case:
    uri = _checkpoint(d / "narrow.pt", ModelConfig(probe_width=64))
    return Case([f"model.checkpoint={uri}"], ["narrow.pt", "probe_width=64", "256", "model.probe_width"], None)


def checkpoint_other_input_shape(d: Path) -> Case:
    uri = _checkpoint(d / "mnist.pt", ModelConfig(), shape=(1, 28, 28))
    return Case(
        [*QUICK, f"model.checkpoint={uri}"],
        ["mnist.pt", "input_shape=[1, 28, 28]", "[1, 8, 8]", "use data with the checkpoint's sample shape"],
        "initial",
    )


def checkpoint_with_code(d: Path) -> Case:
    marker = d / "pwned"
    torch.save({"signature": {"name": "mlp"}, "model_state": {"w": _Exploit(marker)}}, d / "evil.pt")

    def not_run() -> None:
        assert not marker.exists(), "the checkpoint's code ran"

    return Case(
        [f"model.checkpoint={d / 'evil.pt'}"],
        ["evil.pt", "cannot be loaded safely", "system'", "weights_only=True"],
        None,
        after=[not_run],
    )


def mixture_component_empty(d: Path) -> Case:
    """A model whose every output is the same gives every sample the same attribution: the mixture's second
    component stays empty, every sample lands on one side and nothing is left to fine-tune on."""
    uri = _checkpoint(d / "constant.pt", ModelConfig(), zero=True)
    overrides = [*QUICK, f"model.checkpoint={uri}", "detection.signal=attribution"]
    return Case(overrides, ["partition kept 0.0% of the training set as clean", "partition.tau"], "partition")


def clean_side_too_small(d: Path) -> Case:
    overrides = [*QUICK, "initial.epochs=2", "partition.min_clean_fraction=0.99"]
    return Case(overrides, ["as clean (< partition.min_clean_fraction=0.99)"], "partition")


# ---------------------------------------------------------------------------------------------
# The second round: inputs found wrong before any work, or against the data before the first stage after it.


def empty_image_rows(d: Path) -> Case:
    path = _parquet(
        d / "len0.parquet", {"image": pa.array([[]] * 20, type=pa.list_(pa.float32())), "label": [0, 1] * 10}
    )
    return Case(["data.source=parquet", f"data.path={path}"], ["len0.parquet", "every row is empty"], "data")


def image_column_is_the_label_column(d: Path) -> Case:
    path = _parquet(d / "t.parquet", {"image": _image_rows(20), "label": [0, 1] * 10})
    overrides = ["data.source=parquet", f"data.path={path}", "data.image_column=label"]
    return Case(overrides, ["'data.image_column'", "also data.label_column"], None)


def labels_far_beyond_the_samples(d: Path) -> Case:
    path = _parquet(d / "ids.parquet", {"image": _image_rows(20), "label": [0, 10**9] * 10})
    return Case(["data.source=parquet", f"data.path={path}"], ["ids.parquet", "labels go up to 1000000000"], "data")


def cuda_without_a_gpu(d: Path) -> Case:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    return Case(["run.device=cuda"], ["'run.device'", "torch.cuda.is_available() is False", "run.device=auto"], None)


def negative_seed(d: Path) -> Case:
    return Case(["run.seed=-1"], ["'run.seed'", "-1 is outside [0, 4294967294]"], None)


def prune_every_neuron(d: Path) -> Case:
    return Case(["prune.fraction=0.999"], ["'prune.fraction'", "prunes all 256 probe neurons", "at most 0.996"], None)


def setting_the_source_does_not_use(d: Path) -> Case:
    return Case(["data.shape=[1,8,8]"], ["'data.shape'", "used only by data.source=parquet"], None)


def missing_test_table(d: Path) -> Case:
    path = _parquet(d / "t.parquet", {"image": _image_rows(20), "label": [0, 1] * 10})
    overrides = [*QUICK, "data.source=parquet", f"data.path={path}", "data.test_path=/no/test"]
    return Case(overrides, ["'data.test_path'", "'/no/test' does not exist"], None)


def a_test_table_away_from_parquet(d: Path) -> Case:
    return Case(["data.test_path=/t.parquet"], ["'data.test_path'", "read only with data.source=parquet"], None)


def path_for_a_built_in_source(d: Path) -> Case:
    return Case([f"data.path={d}"], ["'data.path'", "digits is built in"], None)


def pairs_the_source_does_not_have(d: Path) -> Case:
    path = _parquet(d / "t.parquet", {"image": _image_rows(20), "label": [0, 1] * 10})
    overrides = ["data.source=parquet", f"data.path={path}", "noise.kind=asymmetric", "noise.apply_to=any"]
    return Case(overrides, ["'noise.pairs'", "no documented class pairs"], None)


def trajectory_of_a_given_model(d: Path) -> Case:
    uri = _checkpoint(d / "given.pt", ModelConfig())
    overrides = [f"model.checkpoint={uri}", "detection.signal=trajectory"]
    return Case(overrides, ["'detection.signal'", "trajectory needs the training trajectory"], None)


def checkpoint_with_nan_weights(d: Path) -> Case:
    uri = _checkpoint(d / "nan.pt", ModelConfig(), nan=True)
    return Case([f"model.checkpoint={uri}"], ["nan.pt", "NaN or infinite weights"], None)


def binary_config_file(d: Path) -> Case:
    (d / "conf.yaml").write_bytes(b"\xff\xfe\x00 not text")
    return Case([], ["conf.yaml' is not a text (UTF-8) file"], None, config_file=str(d / "conf.yaml"))


def sweep_config_to_run(d: Path) -> Case:
    (d / "sweep.yaml").write_text("sweep:\n  tau: [0.5]\n")
    return Case([], ["unknown config key 'sweep'", "raypipe sweep"], None, config_file=str(d / "sweep.yaml"))


def unreachable_ray_cluster(d: Path) -> Case:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    overrides = ["run.executor=ray", f"ray.address=127.0.0.1:{port}"]
    return Case(overrides, [f"cannot connect to the Ray cluster at '127.0.0.1:{port}'", "ray.address"], None)


def out_cannot_be_made(d: Path) -> Case:
    return Case([], ["--out '/proc/raypipe/run'", "cannot create files in '/proc'"], None, out="/proc/raypipe/run")


def out_is_a_file(d: Path) -> Case:
    (d / "file").write_text("mine")
    return Case([], ["is a file, not a folder"], None, out=str(d / "file" / "run"))


def out_empty(d: Path) -> Case:
    return Case([], ["--out is empty"], None, out=" ")


def out_holds_someone_elses_folder(d: Path) -> Case:
    mine = d / "home" / "data" / "thesis.txt"
    mine.parent.mkdir(parents=True)
    mine.write_text("precious")

    def untouched() -> None:
        assert mine.read_text() == "precious" and sorted(p.name for p in (d / "home").iterdir()) == ["data"]

    needles = ["holds a folder 'data' that raypipe did not write"]
    return Case([], needles, None, out=str(d / "home"), after=[untouched])


def input_inside_a_stage_folder(d: Path) -> Case:
    run = d / "old-run"
    uri = _checkpoint(run / "f_ft" / "model.pt", ModelConfig())
    (run / "f_ft" / "_manifest.json").write_text("{}")
    needles = ["'model.checkpoint'", "lies inside", "a stage folder of --out that a run clears"]
    return Case([f"model.checkpoint={uri}"], needles, None, out=str(run))


def too_few_training_samples(d: Path) -> Case:
    overrides = [*QUICK, "data.max_train_samples=3"]
    needles = ["'data.max_train_samples'", "holds 3 samples", "needs at least 4"]
    return Case(overrides, needles, "initial", started=False)


def more_neighbours_than_samples(d: Path) -> Case:
    return Case([*QUICK, "detection.k=500"], ["'detection.k'", "holds 200 training samples"], "initial", started=False)


def model_that_cannot_take_the_samples(d: Path) -> Case:
    path = _parquet(d / "flat.parquet", {"image": _image_rows(40, 6), "label": [0, 1] * 20})
    overrides = [*QUICK, "data.source=parquet", f"data.path={path}", "model.name=cnn_small", "detection.k=5"]
    return Case(overrides, ["'cnn_small' needs image inputs", "shape (6,)"], "initial", started=False)


def diverging_training(d: Path) -> Case:
    overrides = [*QUICK, "initial.optimizer=sgd", "initial.lr=1e8"]
    needles = ["route 'initial': the training loss is nan", "lower initial.lr (now 1e+08)"]
    return Case(overrides, needles, "initial")


CASES = [
    missing_data_dir,
    missing_parquet_uri,
    unknown_uri_scheme,
    bad_out_uri,
    missing_checkpoint,
    truncated_idx,
    corrupt_idx_gzip,
    truncated_cifar,
    corrupt_cifar_pickle,
    malicious_cifar_pickle,
    corrupt_parquet,
    truncated_parquet,
    wrong_idx_image_shape,
    wrong_cifar_dtype,
    wrong_parquet_dtype,
    wrong_parquet_shape,
    labels_out_of_range,
    negative_idx_labels,
    nan_values,
    empty_table,
    single_class,
    noise_rate_one,
    noise_rate_negative,
    unknown_key_in_file,
    wrong_type,
    wrong_type_in_file,
    checkpoint_other_architecture,
    checkpoint_other_probe_width,
    checkpoint_other_input_shape,
    checkpoint_with_code,
    mixture_component_empty,
    clean_side_too_small,
    empty_image_rows,
    image_column_is_the_label_column,
    labels_far_beyond_the_samples,
    cuda_without_a_gpu,
    negative_seed,
    prune_every_neuron,
    setting_the_source_does_not_use,
    missing_test_table,
    a_test_table_away_from_parquet,
    path_for_a_built_in_source,
    pairs_the_source_does_not_have,
    trajectory_of_a_given_model,
    checkpoint_with_nan_weights,
    binary_config_file,
    sweep_config_to_run,
    unreachable_ray_cluster,
    out_cannot_be_made,
    out_is_a_file,
    out_empty,
    out_holds_someone_elses_folder,
    input_inside_a_stage_folder,
    too_few_training_samples,
    more_neighbours_than_samples,
    model_that_cannot_take_the_samples,
    diverging_training,
]


def _argv(case: Case, out: str) -> list[str]:
    argv = ["run", "--out", case.out or out]
    if case.config_file:
        argv += ["--config", case.config_file]
    return argv + case.overrides


def _one_error_line(stderr: str, needles: list[str], only_line: bool) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, stderr
    assert "Traceback" not in stderr, stderr
    if only_line:
        assert lines == errors, stderr
    else:
        assert lines[-1] == errors[0], stderr
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def _nothing_finished(out: Path, stage: str | None, started: bool = True) -> None:
    assert not (out / "report.json").exists() and not (out / "report.md").exists()
    if stage is None:  # refused before any work: not even the run directory
        assert not out.exists(), sorted(out.rglob("*"))
        return
    assert not (out / stage / "_manifest.json").exists()
    if started:
        assert (out / stage / "_pending.json").exists()  # started, not finished: a rerun starts it again
    else:
        assert not (out / stage).exists()  # refused before the stage began
    later = ("data", "initial", "attribution", "partition", "prune", "f_ft")
    for after in later[later.index(stage) + 1 :]:
        assert not (out / after).exists(), after


@pytest.mark.parametrize("build", CASES, ids=[c.__name__ for c in CASES])
def test_bad_input_cli(build, tmp_path, capsys):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    case = build(inputs)
    out = tmp_path / "run"
    code = main(_argv(case, str(out)))
    captured = capsys.readouterr()
    assert code == 2, captured.err
    _one_error_line(captured.err, case.needles, only_line=True)
    if case.out is None:
        _nothing_finished(out, case.stage, case.started)
    for check in case.after:
        check()


def _subprocess(argv: list[str], extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(extra_env or {})}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(
        [sys.executable, "-m", "raypipe.cli", *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize("build", [malicious_cifar_pickle, unknown_key_in_file], ids=lambda b: b.__name__)
def test_bad_input_exit_status_of_the_command(build, tmp_path):
    """The same through `python -m raypipe.cli`: the process's own exit status and stderr."""
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    case = build(inputs)
    out = tmp_path / "run"
    proc = _subprocess(_argv(case, str(out)))
    assert proc.returncode == 2, proc.stderr
    _one_error_line(proc.stderr, case.needles, only_line=False)
    _nothing_finished(out, case.stage)
    for check in case.after:
        check()


# ---------------------------------------------------------------------------------------------
# More GPUs asked for than the cluster has.


def test_use_gpu_semantics():
    """ray.use_gpu: auto = GPUs when the cluster has them; true = required; false = CPU only."""
    from raypipe.distributed.resources import plan_resources

    cpu_only, one_gpu = {"CPU": 4.0}, {"CPU": 4.0, "GPU": 1.0}
    assert RayConfig().use_gpu == "auto"
    assert plan_resources(cpu_only, RayConfig()).use_gpu is False
    assert plan_resources(cpu_only, RayConfig(num_workers=4)).num_workers == 4  # auto on CPUs: CPU workers
    assert plan_resources(one_gpu, RayConfig()).use_gpu is True
    assert plan_resources(one_gpu, RayConfig(use_gpu=True)).use_gpu is True
    assert plan_resources(one_gpu, RayConfig(use_gpu=False)).use_gpu is False
    with pytest.raises(RaypipeError, match=r"'ray.use_gpu': true needs 1 GPU\(s\).* has 0"):
        plan_resources(cpu_only, RayConfig(use_gpu=True))
    with pytest.raises(RaypipeError, match=r"'ray.use_gpu': true needs 4 GPU\(s\).* has 1"):
        plan_resources(one_gpu, RayConfig(use_gpu=True, num_workers=4))
    with pytest.raises(RaypipeError, match="asked for 3 GPU actors/workers but the cluster has 1 GPUs"):
        plan_resources(one_gpu, RayConfig(max_actors=3))  # auto, but GPUs present: the ask is for GPUs


@pytest.mark.ray
def test_more_gpus_than_the_cluster_has(tmp_path):
    """`ray.use_gpu=true ray.num_workers=4` on a CPU-only (local) Ray: refused before any work."""
    pytest.importorskip("ray")
    import torch.cuda

    if torch.cuda.device_count() >= 4:
        pytest.skip("this machine has 4 GPUs")
    out = tmp_path / "run"
    # ray.address=local: a Ray of its own, never a cluster that happens to run on this machine.
    argv = ["run", "--out", str(out), "run.executor=ray", "ray.address=local", "ray.use_gpu=true", "ray.num_workers=4"]
    proc = _subprocess(argv)
    assert proc.returncode == 2, proc.stderr[-3000:]
    _one_error_line(proc.stderr, ["'ray.use_gpu'", "needs 4 GPU(s)", "ray.use_gpu=auto"], only_line=False)
    _nothing_finished(out, None)


def test_sweep_is_checked_before_any_work_too(tmp_path, capsys):
    """`raypipe sweep` runs the same checks before Ray starts, with its own search space: a prune fraction of
    the space that prunes every probe neuron is refused by its key."""
    out = tmp_path / "sweep"
    assert main(["sweep", "--out", str(out), "sweep.prune_fraction=[0.0,0.999]", "model.probe_width=64"]) == 2
    line = _one_error_line(capsys.readouterr().err, ["'sweep.prune_fraction'", "0.999 prunes all 64"], True)
    assert "use at most 0.984" in line
    assert not out.exists()
