"""Partition: which training samples are clean. numpy / scikit-learn, no Ray.

Standardize the attribution matrix (PCA first when it is wide), fit a 2-component Gaussian mixture
with full covariance, and keep the posterior ``p_noisy`` per sample instead of a hard argmax; a
sample is clean when ``p_noisy < tau``.

Which component is "noisy" is decided WITHOUT ground truth (the published notebooks read the true
corruption indices here). Rule: the component whose members have the higher posterior-weighted
mean loss on their given labels is the noisy one. Bad samples, mislabelled or corrupted, are the
ones the model fits worse on their given labels; this holds for every attribution rule because it
only uses the per-sample loss that the attribution pass records anyway. Ground truth, where an
experiment has it, is used only by ``raypipe.core.metrics.detection_metrics`` to score the split.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import chi2
from sklearn.decomposition import PCA
from sklearn.mixture import GaussianMixture
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from raypipe.config import PartitionConfig
from raypipe.errors import RaypipeError

# A 2-component mixture with full covariances needs at least this many rows to fit.
MIN_FIT_ROWS = 4


@dataclass
class MixtureFit:
    """A fitted transform + mixture, small enough to ship to every scoring worker."""

    transform: Pipeline  # standardize (+ PCA): [N, m] -> [N, m']
    mixture: GaussianMixture
    noisy_component: int
    component_mean_loss: list[float]
    # Rows left out of the fit as outliers (a component that had captured only them): see fit_mixture.
    n_outliers_dropped: int = 0

    def describe(self) -> dict:
        """JSON-able parameters (for the report and plots; never unpickled back)."""
        out = {
            "weights": self.mixture.weights_.tolist(),
            "means": self.mixture.means_.tolist(),  # [2, m'] in the transformed space
            "covariances": self.mixture.covariances_.tolist(),  # [2, m', m']
            "noisy_component": self.noisy_component,
            "component_mean_loss": self.component_mean_loss,
            "converged": bool(self.mixture.converged_),
            "pca": "pca" in self.transform.named_steps,
            "n_outliers_dropped": self.n_outliers_dropped,
        }
        if not out["pca"]:  # the map back to raw attribution units: raw = z * scale + mean
            scaler = self.transform.named_steps["scale"]
            out["scale_mean"] = scaler.mean_.tolist()
            out["scale_scale"] = scaler.scale_.tolist()
        return out

    def p_noisy(self, attribution: np.ndarray) -> np.ndarray:
        """[N, m] attribution vectors -> [N] posterior probability of the noisy component."""
        z = self.transform.transform(np.asarray(attribution, dtype=np.float64))
        return self.mixture.predict_proba(z)[:, self.noisy_component].astype(np.float32)


def _transform_for(n_features: int, n_rows: int, cfg: PartitionConfig, seed: int) -> Pipeline:
    steps = [("scale", StandardScaler())]
    if n_features > cfg.max_features:
        steps.append(("pca", PCA(n_components=min(cfg.max_features, n_rows), random_state=seed)))
        steps.append(("rescale", StandardScaler()))
    return Pipeline(steps)


# A refit after leaving outliers out is tried at most this many times.
MAX_OUTLIER_REFITS = 3


def _mahalanobis_sq(z: np.ndarray, mixture: GaussianMixture, component: int) -> np.ndarray:
    """[n, m] rows -> [n] squared Mahalanobis distance to one full-covariance component."""
    diff = z - mixture.means_[component]
    # precisions_cholesky_ is L with precision = L L^T, so |diff @ L|^2 is the squared distance.
    return np.square(diff @ mixture.precisions_cholesky_[component]).sum(axis=1)


def fit_mixture(attribution: np.ndarray, loss: np.ndarray, cfg: PartitionConfig, seed: int = 0) -> MixtureFit:
    """Fit on (a uniform sample of) the rows: attribution [n, m], per-sample given-label loss [n].

    A full-covariance mixture can spend one component on a handful of extreme rows (weight 5e-4 on
    Fashion-MNIST's grad_x_act_label at 20% and 60% noise: every other sample then lands on one side
    and nothing is flagged). When a component's weight is under cfg.min_component_weight, the fit is
    one blob plus outliers: its members and every row outside the big component's 99.9% ellipsoid
    (Mahalanobis distance, chi-square quantile) are left out, and the transform + mixture refitted
    on the rest. Trimming by distance removes outliers at every scale in one refit (dropping only the
    tiny component's members took one refit per scale). Left-out rows are still scored afterwards.
    """
    attribution = np.asarray(attribution, dtype=np.float64)
    if attribution.ndim != 2 or attribution.shape[0] < MIN_FIT_ROWS:
        raise RaypipeError(
            f"partition needs at least {MIN_FIT_ROWS} samples with attributions, got shape {attribution.shape}"
        )
    if not np.isfinite(attribution).all():
        raise RaypipeError("partition: attributions contain NaN or infinite values; check the model checkpoint")
    loss = np.asarray(loss, dtype=np.float64)
    keep = np.ones(len(attribution), dtype=bool)
    for attempt in range(MAX_OUTLIER_REFITS + 1):
        transform = _transform_for(attribution.shape[1], int(keep.sum()), cfg, seed)
        z = transform.fit_transform(attribution[keep])  # [n_kept, m']
        mixture = GaussianMixture(
            n_components=2, covariance_type="full", reg_covar=cfg.reg_covar, random_state=seed, n_init=cfg.n_init
        ).fit(z)
        tiny = int(np.argmin(mixture.weights_))
        if mixture.weights_[tiny] >= cfg.min_component_weight or attempt == MAX_OUTLIER_REFITS:
            break
        outliers = (mixture.predict(z) == tiny) | (_mahalanobis_sq(z, mixture, 1 - tiny) > chi2.ppf(0.999, z.shape[1]))
        if keep.sum() - outliers.sum() < 4:
            break
        keep[np.flatnonzero(keep)[outliers]] = False  # `keep` always matches the last fit's rows
    resp = mixture.predict_proba(z)  # [n_kept, 2]
    weight = resp.sum(axis=0)
    mean_loss = (resp * loss[keep][:, None]).sum(axis=0) / np.maximum(weight, 1e-12)
    noisy = int(np.argmax(mean_loss))
    return MixtureFit(transform, mixture, noisy, [float(v) for v in mean_loss], int((~keep).sum()))


def split(p_noisy: np.ndarray, tau: float) -> np.ndarray:
    """[N] p_noisy -> [N] bool is_clean."""
    return np.asarray(p_noisy) < tau


def check_clean_side(is_clean: np.ndarray, cfg: PartitionConfig) -> None:
    share = float(np.mean(is_clean)) if len(is_clean) else 0.0
    if share < max(cfg.min_clean_fraction, 1e-12):
        raise RaypipeError(
            f"partition kept {share:.1%} of the training set as clean (< partition.min_clean_fraction="
            f"{cfg.min_clean_fraction}); raise partition.tau or try another attribution.rule"
        )
