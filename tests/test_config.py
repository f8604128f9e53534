"""Config: defaults, YAML + overrides, parsing, and errors that name the offending key."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from raypipe.config import Config, config_from_dict, dump_config, load_config, parse_overrides
from raypipe.errors import ConfigError


def test_defaults_validate():
    config = load_config()
    assert config == Config().validate()
    assert config.initial.epochs == 60 and config.f_ft.lr == pytest.approx(1e-3)
    assert config.run.routes == ["l_ft", "f_ft", "relabel", "retrain"]
    assert config.attribution.rule == "loss"
    assert dataclasses.is_dataclass(config) and config.section("partition").tau == 0.5


def test_yaml_file_and_overrides_merge(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "data": {"source": "digits", "max_train_samples": 500},
                "initial": {"epochs": 3, "optimizer": "sgd"},
                "noise": {"kind": "asymmetric", "rate": 0.2},
            }
        )
    )
    config = load_config(path, ["initial.lr=0.01", "noise.rate=0.3", "partition.tau=0.7"])
    # the file's settings, the override on top, every unspecified key of a section keeps its default
    assert config.initial.epochs == 3 and config.initial.optimizer == "sgd" and config.initial.lr == 0.01
    assert config.initial.batch_size == 64 and config.initial.momentum == 0.9
    assert config.noise.kind == "asymmetric" and config.noise.rate == 0.3 and config.noise.sigma == 4.5
    assert config.data.max_train_samples == 500 and config.data.shard_rows == 2048
    assert config.partition.tau == 0.7 and config.partition.max_features == 32
    assert config.retrain.epochs == 60  # another section built from the same class keeps its own defaults


def test_override_keeps_section_defaults():
    config = load_config(None, ["initial.lr=0.01"])
    assert config.initial.lr == 0.01 and config.initial.epochs == 60
    assert config.l_ft.epochs == 10 and config.f_ft.lr == pytest.approx(1e-3)


def test_override_value_parsing():
    config = load_config(
        None,
        [
            "initial.lr=0.05",
            "initial.epochs=7",
            "run.routes=[l_ft,retrain]",
            "ray.use_gpu=false",
            "data.max_train_samples=null",
            "data.shape=[1, 8, 8]",
            "data.path=/some/where.parquet",
            "noise.rate=0",  # an int where a float is expected is fine
            "partition.reg_covar=1.0e-3",
        ],
    )
    assert config.initial.lr == 0.05 and isinstance(config.initial.lr, float)
    assert config.initial.epochs == 7 and isinstance(config.initial.epochs, int)
    assert config.run.routes == ["l_ft", "retrain"]
    assert config.ray.use_gpu is False
    assert config.data.max_train_samples is None
    assert config.data.shape == [1, 8, 8]
    assert config.data.path == "/some/where.parquet"
    assert config.noise.rate == 0.0 and isinstance(config.noise.rate, float)
    assert config.partition.reg_covar == pytest.approx(1e-3)
    assert parse_overrides(["a.b=1", "a.c=x", "d="]) == {"a": {"b": 1, "c": "x"}, "d": None}


def test_override_exponent_without_dot_is_a_float():
    # PyYAML (YAML 1.1) reads '1e-4' as a string; float settings accept it all the same.
    assert load_config(None, ["f_ft.lr=1e-4"]).f_ft.lr == pytest.approx(1e-4)
    with pytest.raises(ConfigError, match="f_ft.lr"):
        load_config(None, ["f_ft.lr=fast"])


def _error(overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    return str(info.value)


@pytest.mark.parametrize(
    "override,key",
    [
        ("noise.rat=0.1", "noise.rat"),
        ("partition.tua=0.3", "partition.tua"),
        ("foo.bar=1", "foo"),
        ("foo=1", "foo"),
    ],
)
def test_unknown_key(override, key):
    message = _error([override])
    assert f"'{key}'" in message and "unknown" in message


@pytest.mark.parametrize(
    "override,key",
    [
        ("initial.epochs=abc", "initial.epochs"),  # string for int
        ("initial.epochs=true", "initial.epochs"),  # bool for int
        ("retrain.epochs=1.5", "retrain.epochs"),  # float for int
        ("noise.rate=high", "noise.rate"),  # string for float
        ("ray.use_gpu=1", "ray.use_gpu"),  # int for bool
        ("run.routes=l_ft", "run.routes"),  # scalar for list
        ("data.source=3", "data.source"),  # int for str
        ("noise.kind=gaussianx", "noise.kind"),  # not one of the literals
        ("noise=3", "noise"),  # a value for a section
        ("noise.rate.x=1", "noise.rate"),
    ],
)
def test_wrong_type_names_the_key(override, key):
    assert f"'{key}'" in _error([override])


@pytest.mark.parametrize(
    "override,key",
    [
        ("noise.rate=1.0", "noise.rate"),
        ("noise.rate=-0.1", "noise.rate"),
        ("partition.tau=0", "partition.tau"),
        ("partition.tau=1.5", "partition.tau"),
        ("run.routes=[foo]", "run.routes"),
        ("run.routes=[l_ft,l_ft]", "run.routes"),
        ("prune.fraction=1.0", "prune.fraction"),
        ("f_ft.lr=0", "f_ft.lr"),
        ("l_ft.epochs=0", "l_ft.epochs"),
        ("model.name=nope", "model.name"),
        ("model.name=user", "model.factory"),
    ],
)
def test_out_of_range_names_the_key(override, key):
    assert f"'{key}'" in _error([override])


def test_fraction_sum():
    assert "'data.val_fraction'" in _error(["data.val_fraction=0.5", "data.test_fraction=0.5"])
    assert load_config(None, ["data.val_fraction=0.5"]).data.val_fraction == 0.5


def test_bad_override_syntax():
    assert "key=value" in _error(["noise.rate"])
    assert "key=value" in _error(["=3"])


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("noise: {rate: 0.4\ninitial: [")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listing)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(empty) == Config()
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("noise:\n  rat: 0.3\n")
    with pytest.raises(ConfigError, match="'noise.rat'"):
        load_config(unknown)


def test_dump_round_trips(tmp_path):
    config = load_config(
        None,
        ["noise.kind=asymmetric", "run.routes=[f_ft]", "data.shape=[1,8,8]", "model.probe_width=32", "f_ft.lr=0.002"],
    )
    text = dump_config(config)
    path = tmp_path / "dumped.yaml"
    path.write_text(text)
    assert load_config(path) == config
    assert config_from_dict(yaml.safe_load(text)) == config
    assert load_config(path) != Config()
