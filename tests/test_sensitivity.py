"""Sensitivity regression from sufficient statistics against scikit-learn's LinearRegression."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LinearRegression

from raypipe.core.sensitivity import SufficientStats, rank_neurons

pytestmark = pytest.mark.usefixtures("one_thread")


def _data(n: int = 300, d: int = 6, seed: int = 0, constant: dict[int, float] | None = None):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) * rng.uniform(0.5, 3.0, size=d) + rng.normal(size=d)
    for j, value in (constant or {}).items():
        x[:, j] = value
    y = (x @ rng.normal(size=d) + 0.7 + rng.normal(scale=0.5, size=n) > 0).astype(np.float64)  # a 0/1 target
    return x.astype(np.float32), y


def _assert_matches_sklearn(stats: SufficientStats, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    beta, intercept = stats.solve()
    ref = LinearRegression().fit(x.astype(np.float64), y)
    assert beta.shape == (x.shape[1],)
    assert np.allclose(beta, ref.coef_, atol=1e-8, rtol=1e-6)
    assert intercept == pytest.approx(ref.intercept_, abs=1e-8)
    assert np.allclose(x.astype(np.float64) @ beta + intercept, ref.predict(x.astype(np.float64)), atol=1e-8)
    return beta


def test_single_block_equals_sklearn():
    x, y = _data()
    stats = SufficientStats(x.shape[1]).update(x, y)
    assert stats.n == len(y)
    _assert_matches_sklearn(stats, x, y)


def test_soft_target_equals_sklearn():
    x, _ = _data(seed=1)
    y = np.random.default_rng(2).uniform(size=len(x))  # p_noisy as the target
    _assert_matches_sklearn(SufficientStats(x.shape[1]).update(x, y), x, y)


def test_uneven_blocks_merged_and_serialized_equal_sklearn():
    x, y = _data(n=257, seed=3)
    bounds = [0, 1, 8, 50, 51, 200, 257]
    blocks = [SufficientStats(x.shape[1]).update(x[a:b], y[a:b]) for a, b in zip(bounds, bounds[1:], strict=False)]
    # ship each block as its dict (what a Ray task returns), merge in a scrambled order on the "driver"
    total = SufficientStats(x.shape[1])
    for k in (4, 0, 5, 2, 1, 3):
        total.merge(SufficientStats.from_dict(blocks[k].to_dict()))
    assert total.n == 257
    single = SufficientStats(x.shape[1]).update(x, y)
    assert np.allclose(total.xtx, single.xtx) and np.allclose(total.xty, single.xty)
    _assert_matches_sklearn(total, x, y)
    again = SufficientStats.from_dict({k: np.array(v) for k, v in total.to_dict().items()})
    assert again.n == total.n and again.width == total.width
    assert np.allclose(again.solve()[0], total.solve()[0], atol=1e-12)


@pytest.mark.parametrize("value", [0.0, 3.0])
def test_constant_column_gets_zero_beta(value):
    """A pruned neuron's activation is constantly 0: the normal equations are singular; beta_j must be 0
    (minimum-norm, as scikit-learn) and the other coefficients and predictions still match."""
    x, y = _data(n=200, d=7, seed=4, constant={2: value, 5: value})
    stats = SufficientStats(7)
    for a, b in ((0, 13), (13, 120), (120, 200)):
        stats.update(x[a:b], y[a:b])
    beta = _assert_matches_sklearn(stats, x, y)
    assert abs(beta[2]) < 1e-9 and abs(beta[5]) < 1e-9
    assert np.abs(np.delete(beta, [2, 5])).min() > 0  # the live neurons do get coefficients


def test_shape_checks():
    stats = SufficientStats(3)
    with pytest.raises(ValueError):
        stats.update(np.zeros((4, 2)), np.zeros(4))
    with pytest.raises(ValueError):
        stats.update(np.zeros((4, 3)), np.zeros(5))
    with pytest.raises(ValueError):
        stats.merge(SufficientStats(4))
    with pytest.raises(ValueError):
        SufficientStats(3).update(np.zeros((1, 3)), np.zeros(1)).solve()


def test_rank_neurons_order():
    beta = np.array([0.1, -0.9, 0.5, 0.0, -0.3, 0.5])
    assert rank_neurons(beta, 3).tolist() == [1, 2, 5]  # by |beta|, ties in index order
    assert rank_neurons(beta, 0).tolist() == []
    assert rank_neurons(beta, 100).tolist() == [1, 2, 5, 4, 0, 3]


def test_rank_neurons_skips_already_pruned():
    beta = np.array([0.1, -0.9, 0.5, 0.0, -0.3, 0.5])
    pruned = np.array([False, True, False, False, False, True])
    assert rank_neurons(beta, 3, pruned).tolist() == [2, 4, 0]
    assert rank_neurons(beta, 10, pruned).tolist() == [2, 4, 0, 3]  # never more than the live neurons
    assert rank_neurons(beta, 2, np.zeros(6, bool)).tolist() == [1, 2]


def test_post_relu_regression_never_ranks_a_neuron_that_never_fires(tmp_path):
    """Neuron 0's pre-activation tracks the noisy samples but stays below 0, so the head never sees it: the
    paper's pre-ReLU regression ranks it first, the post-ReLU one gives it beta 0 and ranks the neuron that fires."""
    from raypipe import storage
    from raypipe.stages.prune import shard_stats
    from raypipe.tables import table_from_columns

    rng = np.random.default_rng(0)
    n = 400
    noisy = rng.random(n) < 0.4
    h = rng.normal(size=(n, 3)).astype(np.float32)
    h[:, 0] = -5.0 + 2.0 * noisy + 0.1 * rng.normal(size=n)  # in [-5.3, -2.7]: never fires
    h[:, 1] = np.abs(h[:, 1]) + 0.5 * noisy  # fires, weakly tied to the noisy samples
    ids = np.arange(n)
    probe_uri, part_uri = str(tmp_path / "probe.parquet"), str(tmp_path / "part.parquet")
    storage.write_table(probe_uri, table_from_columns({"sample_id": ids, "probe": h}))
    part = {"sample_id": ids, "p_noisy": noisy.astype(np.float64), "is_clean": ~noisy}
    storage.write_table(part_uri, table_from_columns(part))
    ranked = {}
    for activation in ("pre_relu", "post_relu"):
        beta, _ = SufficientStats.from_dict(shard_stats(probe_uri, part_uri, "p_noisy", activation)).solve()
        ranked[activation] = rank_neurons(beta, 1)[0]
        if activation == "post_relu":
            assert beta[0] == pytest.approx(0.0, abs=1e-9)
    assert ranked == {"pre_relu": 0, "post_relu": 1}
