"""Every setting of a run: one frozen dataclass per stage (`schema`), loaded from YAML with
``section.key=value`` overrides (`load`)."""

from raypipe.config.load import config_from_dict, dump_config, load_config, parse_overrides
from raypipe.config.schema import (
    MODELS,
    REPAIR_ROUTES,
    ROUTE_TITLES,
    ROUTES,
    RULES,
    SOURCES,
    AttributionConfig,
    Config,
    DataConfig,
    DetectionConfig,
    ModelConfig,
    NoiseConfig,
    PartitionConfig,
    PruneConfig,
    RayConfig,
    RunConfig,
    TrainConfig,
    check_setting,
)

__all__ = [
    "MODELS",
    "REPAIR_ROUTES",
    "ROUTE_TITLES",
    "ROUTES",
    "RULES",
    "SOURCES",
    "AttributionConfig",
    "Config",
    "DataConfig",
    "DetectionConfig",
    "ModelConfig",
    "NoiseConfig",
    "PartitionConfig",
    "PruneConfig",
    "RayConfig",
    "RunConfig",
    "TrainConfig",
    "check_setting",
    "config_from_dict",
    "dump_config",
    "load_config",
    "parse_overrides",
]
