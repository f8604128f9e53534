"""Unit tests of raypipe.core.detection on planted synthetic data (no Ray, seconds)."""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score, roc_auc_score

from raypipe.core.detection.combine import combine_signals
from raypipe.core.detection.decide import class_conditional_flags
from raypipe.core.detection.knn import KnnIndex, prepare_features
from raypipe.core.detection.trajectory import TrajectoryRecorder, margins_and_losses

# ---------------------------------------------------------------------------------------------------------------
# Planted data


def converged_probe(n=1500, c=6, d=32, rate=0.4, pull=0.25, seed=0):
    """Probe features of a model that memorized symmetric label noise.

    Features cluster by TRUE class (pre-ReLU, centres ~N(0, 1)), with the flipped samples pulled a little toward
    their given class (memorization moves them, not all the way). Loss: every sample is fitted, the flipped ones
    only marginally worse: what a converged model's per-sample loss looks like (near chance, docs/detection.md).
    """
    rng = np.random.default_rng(seed)
    mu = rng.normal(0, 1, (c, d))
    true = rng.integers(0, c, n)
    flip = rng.random(n) < rate
    given = true.copy()
    given[flip] = (true[flip] + rng.integers(1, c, flip.sum())) % c
    h = mu[true] + pull * (mu[given] - mu[true]) + 0.5 * rng.normal(0, 1, (n, d))
    loss = rng.exponential(0.01, n) * np.where(flip, 1.1, 1.0)  # memorized: low loss on the flipped label too
    return h.astype(np.float32), given, true, flip, loss


def brute_force_votes(qx, qy, qid, rx, ry, rid, k, c, metric, features, class_balanced):
    """Plain-loop reference: float64 distances, explicit self-exclusion by id, explicit vote weights."""
    q = prepare_features(qx, metric, features).astype(np.float64)
    r = prepare_features(rx, metric, features).astype(np.float64)
    prior = np.bincount(ry, minlength=c) / len(ry)
    agreement, shares_all = [], []
    for i in range(len(q)):
        cand = [j for j in range(len(r)) if qid is None or rid[j] != qid[i]]
        if metric == "cosine":
            dist = [-(q[i] @ r[j]) for j in cand]
        else:
            dist = [((q[i] - r[j]) ** 2).sum() for j in cand]
        order = np.argsort(dist, kind="stable")
        assert np.sort(dist)[k] - np.sort(dist)[k - 1] > 1e-5, "test data must have no tie at the k-th neighbour"
        nn = [cand[j] for j in order[:k]]
        votes = np.zeros(c)
        for j in nn:
            votes[ry[j]] += 1.0 / prior[ry[j]] if class_balanced else 1.0
        shares = votes / votes.sum()
        agreement.append(shares[qy[i]])
        shares_all.append(shares)
    return np.array(agreement), np.array(shares_all)


# ---------------------------------------------------------------------------------------------------------------
# kNN votes: exactness


@pytest.mark.parametrize("metric,features", [("cosine", "relu"), ("cosine", "raw"), ("euclidean", "raw")])
@pytest.mark.parametrize("class_balanced", [False, True])
def test_blockwise_equals_single_block(metric, features, class_balanced):
    h, y, _, _, _ = converged_probe(n=200, c=5, d=16, seed=1)
    ids = np.arange(1000, 1200)
    index = KnnIndex.build(h, y, 5, ref_ids=ids, metric=metric, features=features)
    whole = index.votes(h, y, 7, query_ids=ids, class_balanced=class_balanced, block_size=200, counts=True)
    assert index.votes(h, y, 7, query_ids=ids).counts is None  # only when asked for
    for block_size in (1, 13, 64, None):
        part = index.votes(h, y, 7, query_ids=ids, class_balanced=class_balanced, block_size=block_size, counts=True)
        np.testing.assert_array_equal(part.counts, whole.counts)
        np.testing.assert_array_equal(part.agreement, whole.agreement)
        np.testing.assert_array_equal(part.suggested_label, whole.suggested_label)
        np.testing.assert_array_equal(part.suggested_share, whole.suggested_share)


@pytest.mark.parametrize("metric,features", [("cosine", "relu"), ("cosine", "raw"), ("euclidean", "relu")])
@pytest.mark.parametrize("class_balanced", [False, True])
def test_matches_brute_force_with_query_block_of_shuffled_ids(metric, features, class_balanced):
    rng = np.random.default_rng(2)
    n, c, k = 60, 4, 5
    x = rng.normal(0.3, 1, (n, 12)).astype(np.float32)  # 12 dims: ReLU leaves no ties at the k-th neighbour
    y = rng.integers(0, c, n)
    y[:4] = np.arange(4)  # every class present
    rid = rng.permutation(n) * 7 + 3  # ids unrelated to positions
    q = np.arange(10, 35)  # a query block: a slice of the reference set, ids looked up, not positions
    index = KnnIndex.build(x, y, c, ref_ids=rid, metric=metric, features=features)
    got = index.votes(x[q], y[q], k, query_ids=rid[q], class_balanced=class_balanced, block_size=4, counts=True)
    want_agree, want_shares = brute_force_votes(x[q], y[q], rid[q], x, y, rid, k, c, metric, features, class_balanced)
    np.testing.assert_allclose(got.agreement, want_agree, rtol=1e-6, atol=1e-7)
    _, plain_shares = brute_force_votes(x[q], y[q], rid[q], x, y, rid, k, c, metric, features, False)
    np.testing.assert_array_equal(got.counts, np.rint(plain_shares * k))  # unweighted neighbour label counts
    best = want_shares.max(axis=1)
    # Suggested label: the argmax, a tie kept on the given label.
    for i, s in enumerate(got.suggested_label):
        assert want_shares[i, s] == pytest.approx(best[i])
        if want_agree[i] == pytest.approx(best[i]):
            assert s == y[q][i]
    np.testing.assert_allclose(got.suggested_share, best, rtol=1e-6)


def test_self_exclusion_drops_own_label():
    # Pairs of near-identical points with DIFFERENT labels: each point's nearest other point is its twin.
    rng = np.random.default_rng(3)
    centres = rng.normal(0, 1, (50, 8)) * 10
    x = np.repeat(centres, 2, axis=0) + rng.normal(0, 0.3, (100, 8))  # twins far apart enough for float32
    y = np.tile([0, 1], 50)
    ids = np.arange(100)
    with_self = KnnIndex.build(x, y, 2, features="raw").votes(x, y, 1).agreement
    index = KnnIndex.build(x, y, 2, ref_ids=ids, features="raw")
    without = index.votes(x, y, 1, query_ids=ids).agreement
    assert np.all(with_self == 1.0)  # its own row is its nearest neighbour
    assert np.all(without == 0.0)  # its twin carries the other label
    # A query id absent from the index excludes nothing.
    absent = index.votes(x, y, 1, query_ids=ids + 1000).agreement
    assert np.all(absent == 1.0)


def test_class_balanced_weights_votes_by_inverse_prior():
    # Query of class 1 (prior 0.1); its 5 neighbours: 2 of class 1, 3 of class 0 (prior 0.9).
    ref_y = np.array([1] * 10 + [0] * 90)
    ref_x = np.zeros((100, 2), dtype=np.float32)
    ref_x[:, 0] = np.arange(100) + 100.0  # far from the query...
    ref_x[[0, 1, 10, 11, 12], 0] = [0.1, 0.2, 0.3, 0.4, 0.5]  # ...except these five
    q = np.zeros((1, 2), dtype=np.float32)
    index = KnnIndex.build(ref_x, ref_y, 2, metric="euclidean", features="raw")
    plain = index.votes(q, [1], 5)
    bal = index.votes(q, [1], 5, class_balanced=True)
    assert plain.agreement[0] == pytest.approx(0.4) and plain.suggested_label[0] == 0
    want = (2 / 0.1) / (2 / 0.1 + 3 / 0.9)
    assert bal.agreement[0] == pytest.approx(want) and bal.suggested_label[0] == 1


def test_subsampled_reference_still_detects():
    # The partition stage searches a uniform sample of the training set; every sample is a query, and one
    # whose own row is not in the sample has nothing to exclude.
    h, y, _, flip, _ = converged_probe(n=1500, seed=4)
    ids = np.arange(1500)
    keep = np.sort(np.random.default_rng(7).choice(1500, size=500, replace=False))
    index = KnnIndex.build(h[keep], y[keep], 6, ref_ids=ids[keep])
    votes = index.votes(h, y, 10, query_ids=ids)
    assert roc_auc_score(flip, 1 - votes.agreement) > 0.95


def test_argument_errors():
    x = np.zeros((5, 3), dtype=np.float32)
    y = np.zeros(5, dtype=np.int64)
    ids = np.arange(5)
    with pytest.raises(ValueError, match="k=5"):
        KnnIndex.build(x, y, 2, ref_ids=ids).votes(x, y, 5, query_ids=ids)  # only 4 others
    with pytest.raises(ValueError, match="unique"):
        KnnIndex.build(x, y, 2, ref_ids=np.zeros(5))
    with pytest.raises(ValueError, match="labels"):
        KnnIndex.build(x, y, 2).votes(x, y + 3, 2)


def test_index_pickles_for_workers_and_accepts_read_only_blocks():
    h, y, _, _, _ = converged_probe(n=300, seed=14)
    ids = np.arange(300)
    index = KnnIndex.build(h, y, 6, ref_ids=ids, metric="euclidean")
    want = index.votes(h[:50], y[:50], 5, query_ids=ids[:50])  # fills the device cache
    shipped = pickle.loads(pickle.dumps(index))
    assert shipped._on_device == {}  # tensors are not shipped, numpy is
    for arr in (shipped.x, shipped.labels, h, y):
        arr.setflags(write=False)  # as Ray's object store hands them out
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = shipped.votes(h[:50], y[:50], 5, query_ids=ids[:50])
    np.testing.assert_array_equal(got.agreement, want.agreement)


# ---------------------------------------------------------------------------------------------------------------
# kNN votes: detection on a "converged model"


def test_neighbour_agreement_finds_memorized_flips_where_loss_does_not():
    h, y, _, flip, loss = converged_probe(n=1500, seed=5)
    ids = np.arange(len(y))
    v = KnnIndex.build(h, y, 6, ref_ids=ids).votes(h, y, 10, query_ids=ids)
    auroc_knn = roc_auc_score(flip, 1 - v.agreement)
    auroc_loss = roc_auc_score(flip, loss)
    assert auroc_knn > 0.95, auroc_knn
    assert auroc_loss < 0.65, auroc_loss
    # The suggested label recovers the TRUE label of most flipped samples (chance: 1 / 6).
    _, _, true, _, _ = converged_probe(n=1500, seed=5)
    assert (v.suggested_label[flip] == true[flip]).mean() > 0.8


# ---------------------------------------------------------------------------------------------------------------
# Class-conditional decisions


def cyclic_pair_scores(seed=0, per_class=400, c=5, rate=0.4):
    """Cyclic pair flips c -> c+1: every given class holds its clean samples plus 40% of the previous class.

    Suspicion baselines differ by class (0.1 * c): the flipped samples sit 0.3 above THEIR class's clean ones,
    so class 0's flips (0.3) lie below class 4's clean samples (0.4), and no single threshold separates them.
    """
    rng = np.random.default_rng(seed)
    true = np.repeat(np.arange(c), per_class)
    flip = np.zeros(len(true), bool)
    for a in range(c):
        idx = np.flatnonzero(true == a)
        flip[rng.choice(idx, int(rate * per_class), replace=False)] = True
    given = np.where(flip, (true + 1) % c, true)
    score = 0.1 * given + np.where(flip, 0.3, 0.0) + rng.normal(0, 0.04, len(true))
    return score, given, flip


def test_threshold_per_class_beats_global_threshold_on_cyclic_pairs():
    score, given, flip = cyclic_pair_scores()
    per_class = class_conditional_flags(score, given, 5, method="threshold")
    global_ = class_conditional_flags(score, np.zeros_like(given), 1, method="threshold")
    f1_class, f1_global = f1_score(flip, per_class.flagged), f1_score(flip, global_.flagged)
    assert f1_class > 0.9 and f1_class > f1_global + 0.2, (f1_class, f1_global)
    assert all(pc["decided_by"] == "class" for pc in per_class.per_class)
    # CL's t_c in agreement terms: flagged iff agreement (1 - score) < mean agreement of the class.
    agreement = 1 - score
    t = np.array([agreement[given == c].mean() for c in range(5)])
    np.testing.assert_array_equal(per_class.flagged, agreement < t[given])


def dataset_pair_scores(seed=0, per_class=500):
    """Fashion-MNIST-like pairs at 40%: a swap 0 <-> 1 and a one-way flip 2 -> 3; classes 4, 5 clean.

    Suspicion baselines as measured for kNN disagreement on Fashion-MNIST pair flips (tests' module report):
    both classes of a swap sit high (clean ~0.42, flipped ~0.58: one overlapping population per class); the
    one-way target class is bimodal (clean ~0.03, flipped ~0.35); the source and the clean classes are low.
    """
    rng = np.random.default_rng(seed)
    true = np.repeat(np.arange(6), per_class)
    flip = np.zeros(len(true), bool)
    for a in (0, 1, 2):
        flip[rng.choice(np.flatnonzero(true == a), int(0.4 * per_class), replace=False)] = True
    partner = np.array([1, 0, 3, 3, 4, 5])
    given = np.where(flip, partner[true], true)
    clean_base = np.array([0.42, 0.42, 0.08, 0.03, 0.03, 0.1])
    flip_base = np.array([0.58, 0.58, 0.0, 0.35, 0.0, 0.0])
    base = np.where(flip, flip_base[given], clean_base[given])
    score = np.clip(base + rng.normal(0, 0.06, len(true)), 0, 1)
    return score, given, flip


def test_mixture_per_class_beats_global_mixture_on_pair_flips():
    score, given, flip = dataset_pair_scores()
    per_class = class_conditional_flags(score, given, 6, method="mixture")
    global_ = class_conditional_flags(score, np.zeros_like(given), 1, method="mixture", max_flag_fraction=None)
    f1_class, f1_global = f1_score(flip, per_class.flagged), f1_score(flip, global_.flagged)
    assert f1_class > 0.8 and f1_class > f1_global + 0.15, (f1_class, f1_global)
    decided = {pc["class"]: pc["decided_by"] for pc in per_class.per_class}
    assert decided[3] == "class"  # the bimodal target class gets its own fit
    # The swapped classes are one population each, flagged en bloc by the global rule: the majority-correct
    # cap hands them to their class-mean threshold instead.
    assert decided[0] == decided[1] == "class_threshold"
    assert per_class.flagged[given == 0].mean() < 0.6 and global_.flagged[given == 0].mean() > 0.9


def test_fallbacks_for_small_and_degenerate_classes():
    rng = np.random.default_rng(6)
    small = [0.9, 0.05, 0.1, 0.02]  # a class of 4: one high score
    high = [0.9, 0.95, 0.92]  # a class of 3, all high: the global rule would flag all of it
    score = np.concatenate([rng.normal(0, 0.05, 300), rng.normal(1, 0.05, 200), small, np.full(40, 0.2), high])
    labels = np.concatenate([np.zeros(500, int), [1] * 4, [2] * 40, [4] * 3])
    for method in ("threshold", "mixture"):
        out = class_conditional_flags(score, labels, 5, method=method, min_class_size=20)
        info = {pc["class"]: pc for pc in out.per_class}
        assert info[1]["decided_by"] == "global" and "too few" in info[1]["reason"]
        assert info[2]["decided_by"] == "global" and "equal" in info[2]["reason"]
        assert info[3]["n"] == 0
        # The small class is decided by the global rule: its high score flagged, its low ones not.
        np.testing.assert_array_equal(out.flagged[500:504], [True, False, False, False])
        # Majority-correct cap: the all-high class is handed to its class-mean threshold (flags 0.95 only).
        assert info[4]["decided_by"] == "class_threshold"
        np.testing.assert_array_equal(out.flagged[544:], [False, True, False])
        assert out.p_noisy.shape == (547,) and np.all((out.p_noisy >= 0) & (out.p_noisy <= 1))
        uncapped = class_conditional_flags(score, labels, 5, method=method, min_class_size=20, max_flag_fraction=None)
        assert uncapped.flagged[544:].all()


# ---------------------------------------------------------------------------------------------------------------
# Trajectory


def test_margins_and_losses_by_hand():
    logits = np.array([[2.0, 1.0, -1.0], [0.0, 3.0, 1.0]])
    margin, loss = margins_and_losses(logits, np.array([0, 2]))
    np.testing.assert_allclose(margin, [1.0, -2.0])
    want = F.cross_entropy(torch.tensor(logits), torch.tensor([0, 2]), reduction="none").numpy()
    np.testing.assert_allclose(loss, want, rtol=1e-12)


def test_recorder_matches_recomputation_from_checkpoints():
    torch.manual_seed(0)
    rng = np.random.default_rng(8)
    n, c = 240, 4
    x = torch.tensor(rng.normal(0, 1, (n, 10)), dtype=torch.float32)
    y = torch.tensor(rng.integers(0, c, n))
    ids = rng.permutation(n) + 5000  # the recorder is addressed by sample id
    model = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.ReLU(), torch.nn.Linear(16, c))
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    rec = TrajectoryRecorder(sample_ids=ids)
    halves = [TrajectoryRecorder(num_samples=n), TrajectoryRecorder(num_samples=n)]  # a 2-worker split
    checkpoints = []
    for epoch in range(4):
        for b in torch.randperm(n).split(32):
            opt.zero_grad()
            F.cross_entropy(model(x[b]), y[b]).backward()
            opt.step()
        checkpoints.append(copy.deepcopy(model.state_dict()))
        with torch.no_grad():  # the end-of-epoch eval pass feeds the recorder
            for b in torch.arange(n).split(50):
                logits = model(x[b])
                rec.update(ids[b.numpy()], logits, y[b], epoch=epoch)
                halves[int(b[0]) % 2].update(b, logits, y[b], epoch=epoch)

    replay = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.ReLU(), torch.nn.Linear(16, c))
    saved = []
    for state in checkpoints:
        replay.load_state_dict(state)
        with torch.no_grad():
            saved.append(replay(x).numpy())
    saved = np.stack(saved)  # [E, N, C]
    want_aum = np.mean([margins_and_losses(logits, y.numpy())[0] for logits in saved], axis=0)  # AUM by hand
    np.testing.assert_allclose(rec.aum(), want_aum, rtol=1e-5, atol=1e-6)
    want_loss1 = F.cross_entropy(torch.tensor(saved[1]), y, reduction="none").numpy()
    np.testing.assert_allclose(rec.early_loss(1), want_loss1, rtol=1e-5, atol=1e-6)
    want_wrong = (saved.argmax(axis=2) != y.numpy()).mean(axis=0)  # share of epochs predicted wrong, by hand
    assert 0 < want_wrong.mean() < 1
    np.testing.assert_array_equal(rec.wrong_event_share(), want_wrong)
    merged = halves[0].merge(halves[1])
    np.testing.assert_allclose(merged.aum(), want_aum, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(merged.wrong_event_share(), want_wrong)
    np.testing.assert_allclose(merged.early_loss(3), rec.early_loss(3))
    assert not np.allclose(want_aum, margins_and_losses(saved[-1], y.numpy())[0])  # AUM is not the last margin
    restored = TrajectoryRecorder(sample_ids=ids)
    restored.load_state_dict(rec.state_dict())
    np.testing.assert_array_equal(restored.aum(), rec.aum())
    np.testing.assert_array_equal(restored.wrong_count, rec.wrong_count)
    with pytest.raises(KeyError):
        rec.early_loss(7)
    with pytest.raises(KeyError):
        rec.update(np.array([1]), np.zeros((1, c)), np.array([0]), epoch=0)  # an unknown id


def test_recorder_state_survives_a_weights_only_checkpoint():
    rng = np.random.default_rng(15)
    ids = rng.permutation(50) + 900
    rec = TrajectoryRecorder(sample_ids=ids, keep_loss_epochs=[0, 2])
    for epoch in range(3):
        seen = ids[: 40 + 5 * epoch]  # some samples never seen: NaN AUM and loss survive too
        rec.update(seen, torch.tensor(rng.normal(0, 1, (len(seen), 3))), rng.integers(0, 3, len(seen)), epoch=epoch)
    buf = io.BytesIO()
    torch.save({"recorder": rec.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)["recorder"]
    restored = TrajectoryRecorder(sample_ids=ids, keep_loss_epochs=[0, 2])
    restored.load_state_dict(state)
    np.testing.assert_array_equal(restored.aum(), rec.aum())
    np.testing.assert_array_equal(restored.wrong_event_share(), rec.wrong_event_share())
    assert restored.wrong_count.dtype == np.int64 and rec.wrong_count.sum() > 0
    for epoch in (0, 2):
        np.testing.assert_array_equal(restored.early_loss(epoch), rec.early_loss(epoch))
    assert sorted(restored.losses) == [0, 2] and restored.count.dtype == np.int64
    # Resuming continues the same sums.
    for r in (rec, restored):
        r.update(ids[:10], np.ones((10, 3)), np.zeros(10, dtype=np.int64), epoch=3)
    np.testing.assert_array_equal(restored.aum(), rec.aum())


def test_recorder_keeps_only_requested_loss_epochs_and_marks_unseen():
    rec = TrajectoryRecorder(num_samples=4, keep_loss_epochs=[0])
    rec.update([0, 1], np.array([[1.0, 0.0], [0.0, 1.0]]), [0, 0], epoch=0)
    rec.update([0, 1], np.array([[3.0, 0.0], [0.0, 1.0]]), [0, 0], epoch=1)
    rec.update([1], np.array([[2.0, 2.0]]), [0], epoch=2)  # a tie is a wrong event (the label does not win)
    np.testing.assert_allclose(rec.aum()[:2], [2.0, -2.0 / 3])
    np.testing.assert_allclose(rec.wrong_event_share()[:2], [0.0, 1.0])
    assert np.isnan(rec.aum()[2:]).all() and np.isnan(rec.early_loss(0)[2:]).all()
    assert np.isnan(rec.wrong_event_share()[2:]).all()
    assert sorted(rec.losses) == [0]


# ---------------------------------------------------------------------------------------------------------------
# Combining signals without ground truth


def test_combine_signals_picks_the_informative_signal():
    h, y, _, flip, loss = converged_probe(n=1500, seed=9)
    ids = np.arange(len(y))
    knn = 1 - KnnIndex.build(h, y, 6, ref_ids=ids).votes(h, y, 10, query_ids=ids).agreement
    rng = np.random.default_rng(10)
    signals = {
        "noise_uniform": rng.random(len(y)),
        "noise_gauss": rng.normal(0, 1, len(y)),
        "memorized_loss": loss,  # skewed, one population: the power transform must not mistake skew for groups
        "knn": knn,
    }
    score, used = combine_signals(signals)
    assert used["chosen"] == ["knn"], used["why"]
    # Only one signal sees the noise, so no consensus forms (loadings fitted to chance correlations are
    # meaningless); the separation step chooses, and the uniform decoy (Ashman D ~3) loses.
    assert used["rule"] == "separation"
    assert roc_auc_score(flip, score) > 0.95
    # The choice never looked at `flip`; shuffling the uninformative signals' order does not change it.
    score2, used2 = combine_signals(dict(reversed(list(signals.items()))))
    assert used2["chosen"] == ["knn"]
    np.testing.assert_allclose(score, score2)


def test_combine_signals_two_signals_falls_back_to_separation():
    h, y, _, flip, _ = converged_probe(n=1500, seed=11)
    ids = np.arange(len(y))
    knn = 1 - KnnIndex.build(h, y, 6, ref_ids=ids).votes(h, y, 10, query_ids=ids).agreement
    noise = np.random.default_rng(12).random(len(y))  # uniform: Ashman D ~3, the hardest pure-noise case
    score, used = combine_signals({"noise": noise, "knn": knn})
    assert used["rule"] == "separation" and used["chosen"] == ["knn"], used["why"]
    assert roc_auc_score(flip, score) > 0.95


def test_combine_signals_consensus_weights_three_views_and_ignores_noise():
    rng = np.random.default_rng(13)
    n = 3000
    noisy = rng.random(n) < 0.3
    views = {f"view{i}": noisy * strength + rng.normal(0, 1, n) for i, strength in enumerate((3.0, 2.0, 1.0))}
    views["noise"] = rng.normal(0, 1, n)
    score, used = combine_signals(views)
    assert used["rule"] == "consensus" and sorted(used["chosen"]) == ["view0", "view1", "view2"], used["why"]
    w = used["weights"]
    assert w["view0"] > w["view1"] > w["view2"] > 0  # better detectors count more, found without labels
    assert roc_auc_score(noisy, score) >= roc_auc_score(noisy, views["view0"]) - 0.005
