"""`raypipe sweep`: a Ray Tune search over the repair's settings. `space`: the search space and its
config section; `trial`: the shared stages and one trial (the pipeline from the partition on);
`outputs`: the trials table and the best trial. Ray Tune's wrapper is `raypipe.distributed.tune`."""

from raypipe.sweep.outputs import choose_best, read_table, write_outputs
from raypipe.sweep.space import SweepConfig, SweepJobConfig, TrialSpec, load_sweep_config, trial_config, trial_specs
from raypipe.sweep.trial import METRIC, prepare_base, run_trial, validation_set

__all__ = [
    "METRIC",
    "SweepConfig",
    "SweepJobConfig",
    "TrialSpec",
    "choose_best",
    "load_sweep_config",
    "prepare_base",
    "read_table",
    "run_trial",
    "trial_config",
    "trial_specs",
    "validation_set",
    "write_outputs",
]
