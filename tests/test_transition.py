"""Unit tests of the noise transition estimate, the per-class quotas and FINE's alignment, on planted matrices and
planted subspaces with known answers (no Ray, seconds)."""

from __future__ import annotations

import numpy as np
import pytest

from raypipe.core.detection.fine import ClassGram, alignment
from raypipe.core.detection.transition import (
    corruption_posterior,
    empirical_transition,
    estimate_from_neighbours,
    estimate_transition,
    neighbourhood_noise_posterior,
    noise_structure,
    noisy_share_per_given_class,
    plurality_cap,
    quota_flags,
    transition_error,
)

C = 6


def symmetric(rate: float, c: int = C) -> np.ndarray:
    t = np.full((c, c), rate / (c - 1))
    np.fill_diagonal(t, 1 - rate)
    return t


def pairs(rate: float, flips: dict[int, int], c: int = C) -> np.ndarray:
    t = np.eye(c)
    for a, b in flips.items():
        t[a, a], t[a, b] = 1 - rate, rate
    return t


def neighbourhoods(t: np.ndarray, prior: np.ndarray, n: int, k: int, seed: int, contamination: float = 0.0):
    """Planted clusterable data: true classes ~ prior, given labels ~ T[true]; each sample's k neighbours share its
    true class (with probability 1 - contamination, else a uniformly drawn class) and carry labels ~ T[their class].
    -> (true [n], given [n], neighbour label counts [n, C])."""
    rng = np.random.default_rng(seed)
    c = len(t)
    true = rng.choice(c, size=n, p=prior)
    cum = t.cumsum(axis=1)

    def draw(classes):  # one given label per entry of `classes`, from its row of T
        return np.minimum((rng.random(classes.shape)[..., None] > cum[classes]).sum(-1), c - 1)

    given = draw(true)
    source = np.where(rng.random((n, k)) < contamination, rng.integers(0, c, (n, k)), true[:, None])
    counts = np.zeros((n, c), dtype=np.int64)
    np.add.at(counts, (np.repeat(np.arange(n), k), draw(source).ravel()), 1)
    return true, given, counts


@pytest.mark.parametrize(
    "name,t",
    [
        ("symmetric 40%", symmetric(0.4)),
        ("swapped pairs 40% and a one-way flip", pairs(0.4, {0: 1, 1: 0, 2: 3})),
        ("cyclic 40%", pairs(0.4, {a: (a + 1) % C for a in range(C)})),
        ("symmetric 60%", symmetric(0.6)),
    ],
)
def test_em_recovers_planted_transition_matrices(name, t):
    prior = np.array([0.1, 0.15, 0.2, 0.15, 0.25, 0.15])
    true, given, counts = neighbourhoods(t, prior, n=6000, k=30, seed=1)
    est = estimate_from_neighbours(given, counts, C)
    t_hat = np.array(est["estimate"])
    assert t_hat.shape == (C, C) and np.allclose(t_hat.sum(axis=1), 1)
    assert transition_error(t_hat, t) < 0.01, (name, np.round(t_hat, 2))
    np.testing.assert_allclose(est["prior"], np.bincount(true, minlength=C) / len(true), atol=0.01)
    # The quotas match each given class's real share of wrong labels.
    real = [float((true[given == c] != c).mean()) for c in range(C)]
    np.testing.assert_allclose(est["quota"], real, atol=0.03)


def test_em_start_keeps_each_row_on_its_own_class_for_a_balanced_swap():
    """A 40% swap of two equally frequent classes: the first three labels' moments fit (0.5, 0.5) rows as well as
    the truth (why HOC's moment matching was dropped); whole neighbourhoods tell them apart."""
    t = pairs(0.4, {0: 1, 1: 0})
    _, given, counts = neighbourhoods(t, np.full(C, 1 / C), n=6000, k=30, seed=2)
    t_hat, _, posterior, info = estimate_transition(counts + np.eye(C, dtype=np.int64)[given], C)
    np.testing.assert_allclose(t_hat[:2, :2], [[0.6, 0.4], [0.4, 0.6]], atol=0.03)
    assert posterior.shape == (6000, C) and np.allclose(posterior.sum(axis=1), 1)
    assert info["iterations"] >= 2


def test_contaminated_neighbourhoods_overstate_noise_but_keep_its_structure():
    t = pairs(0.4, {a: (a + 1) % C for a in range(C)})
    _, given, counts = neighbourhoods(t, np.full(C, 1 / C), n=4000, k=30, seed=3, contamination=0.1)
    est = estimate_from_neighbours(given, counts, C)
    assert est["structure"]["class_dependent"]
    assert 0.4 < est["structure"]["noise_rate"] < 0.5  # 10% of the neighbours from anywhere add spread noise


def test_noisy_share_per_given_class_by_bayes():
    # 0 -> 1 at 40% (one way), equal priors: given class 1 holds 0.4 / 1.4 wrong labels, given class 0 none;
    # its own row says nothing of that (1 - T[1, 1] = 0).
    t = pairs(0.4, {0: 1}, c=3)
    share = noisy_share_per_given_class(t, np.full(3, 1 / 3))
    np.testing.assert_allclose(share, [0.0, 0.4 / 1.4, 0.0])


def test_noise_structure_tells_spread_from_concentrated_noise():
    uniform = noise_structure(symmetric(0.4), np.full(C, 1 / C))
    assert uniform["concentration"] == pytest.approx(1 / (C - 1)) and not uniform["class_dependent"]
    assert uniform["noise_rate"] == pytest.approx(0.4)
    paired = noise_structure(pairs(0.4, {0: 1, 1: 0, 2: 3}), np.full(C, 1 / C))
    assert paired["concentration"] == pytest.approx(1.0) and paired["class_dependent"]
    assert paired["noise_rate"] == pytest.approx(0.2)
    assert noise_structure(np.eye(C), np.full(C, 1 / C))["concentration"] == 0.0  # no noise at all


def test_quota_flags_take_the_top_share_of_each_class():
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 2])
    score = np.array([0.1, 0.9, 0.5, 0.7, 0.2, 0.3, 0.4, 0.35, 0.0, 5.0])
    flags = quota_flags(score, labels, np.array([0.5, 0.2, 0.0]))
    np.testing.assert_array_equal(np.flatnonzero(flags), [1, 3, 6])  # top 2 of class 0, top 1 of class 1, none of 2
    with pytest.raises(ValueError):
        quota_flags(score, labels, np.array([1.5, 0.0, 0.0]))


def test_empirical_transition_and_error_by_hand():
    true = np.array([0, 0, 0, 0, 1, 1])
    given = np.array([0, 0, 0, 1, 1, 1])
    t = empirical_transition(true, given, 3)
    np.testing.assert_allclose(t, [[0.75, 0.25, 0], [0, 1, 0], [0, 0, 1]])  # class 2 absent: identity row
    assert transition_error(t, np.eye(3)) == pytest.approx(0.5 / 9)


def test_fine_alignment_finds_flips_in_planted_subspaces():
    rng = np.random.default_rng(4)
    c, d, n = 4, 24, 2000
    axes = np.linalg.qr(rng.normal(0, 1, (d, c)))[0].T  # one orthonormal direction per true class
    true = rng.integers(0, c, n)
    flip = rng.random(n) < 0.3
    given = np.where(flip, (true + rng.integers(1, c, n)) % c, true)
    h = axes[true] * rng.normal(3, 0.3, (n, 1)) + rng.normal(0, 0.4, (n, d))
    gram = ClassGram(c, d)
    for block in np.array_split(np.arange(n), 3):  # sums per shard, merged
        gram.merge(ClassGram.from_dict(ClassGram(c, d).update(h[block], given[block]).to_dict()))
    directions = gram.directions()
    # Each class's direction is its true axis (up to sign), though 30% of its members belong elsewhere.
    np.testing.assert_allclose(np.abs((directions * axes).sum(axis=1)), 1.0, atol=0.02)
    a = alignment(h, given, directions)
    assert a.dtype == np.float32 and np.all((a >= 0) & (a <= 1 + 1e-6))
    assert a[flip].max() < a[~flip].min()  # every flipped sample is less aligned than every clean one
    assert a[flip].mean() < 0.1 < 0.6 < a[~flip].mean()


def test_quotas_are_capped_where_a_class_would_not_be_mostly_its_own():
    # A one-way flip at 40% into a class of its own size: the plurality condition allows at most half of a given
    # class to be wrong when its wrong labels come from one class, (C - 1) / C when they are spread evenly.
    assert plurality_cap(1.0) == pytest.approx(0.5) and plurality_cap(1 / (C - 1)) == pytest.approx((C - 1) / C)
    t = pairs(0.4, {a: (a + 1) % C for a in range(C)})
    _, given, counts = neighbourhoods(t, np.full(C, 1 / C), n=3000, k=30, seed=5)
    counts[given == 0] = 0
    counts[given == 0, 5] = 30  # every given-0 sample sits among class-5 labels: the estimate calls class 0 all wrong
    est = estimate_from_neighbours(given, counts, C)
    cap = plurality_cap(est["structure"]["concentration"])
    assert est["structure"]["class_dependent"] and 0.5 <= cap < est["noisy_share"][0]
    assert est["quota"][0] == pytest.approx(cap)
    np.testing.assert_allclose(est["quota"][1:], np.minimum(est["noisy_share"][1:], cap))


def test_corruption_posterior_is_bayes_on_known_answers():
    # Pairs 0 <-> 1 at 40%: a sure class-0 image labelled 1 is wrong for sure; labelled 0, right for sure. An image
    # that is 0 or 1 with equal odds and labelled 1: P(wrong) = 0.5 * 0.4 / (0.5 * 0.4 + 0.5 * 0.6) = 0.4.
    t = pairs(0.4, {0: 1, 1: 0})
    probs = np.zeros((4, C))
    probs[0, 0] = probs[1, 0] = 1.0
    probs[2, :2] = probs[3, :2] = 0.5
    posterior = corruption_posterior(probs, t, np.array([1, 0, 1, 2]))
    np.testing.assert_allclose(posterior[:3], [1.0, 0.0, 0.4])
    # A label nothing could have produced (T[i, 2] = 0 for i in {0, 1}): no evidence either way, called right.
    assert posterior[3] == 0.0
    # Symmetric noise at rate r: P(wrong) = 1 - p_g (1 - r) / (p_g (1 - r) + (1 - p_g) r / (C - 1)); without
    # noise (T = I) no label is wrong, whatever the model believes.
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(C), size=50)
    given = rng.integers(0, C, size=50)
    p_given = p[np.arange(50), given]
    expected = 1 - p_given * 0.6 / (p_given * 0.6 + (1 - p_given) * 0.4 / (C - 1))
    np.testing.assert_allclose(corruption_posterior(p, symmetric(0.4), given), expected)
    assert not corruption_posterior(p, np.eye(C), given).any()


def test_neighbourhood_noise_posterior_knows_which_classes_can_produce_a_label():
    # Cyclic flips at 40% (every class to the next), planted neighbourhoods of 30 (10% of neighbours from anywhere).
    # A wrong label sits among neighbours labelled 60% / 40% by its true class's row of T: its agreement (~0.4) looks
    # like an ambiguous sample's, but only one class can produce that label by a flip, and the posterior says so.
    t = pairs(0.4, {a: (a + 1) % C for a in range(C)})
    prior = np.full(C, 1 / C)
    true, given, counts = neighbourhoods(t, prior, n=4000, k=30, seed=3, contamination=0.1)
    wrong = given != true
    p = neighbourhood_noise_posterior(given, counts, t, prior)
    assert p.shape == (4000,) and np.all((p >= 0) & (p <= 1))
    assert ((p >= 0.5) == wrong).mean() > 0.97  # the Bayes decision is right on nearly every sample
    agreement = counts[np.arange(4000), given] / 30
    assert ((agreement < 0.5) == wrong).mean() < 0.9  # plain agreement at its natural cut is far worse
    # The same posterior from the EM's own estimate (no ground truth) decides alike.
    est = estimate_from_neighbours(given, counts, C)
    p_hat = neighbourhood_noise_posterior(given, counts, np.asarray(est["estimate"]), np.asarray(est["prior"]))
    assert ((p_hat >= 0.5) == wrong).mean() > 0.95
