"""Sample-quality metrics on classifier features: Fréchet distance (FID-style) and diversity."""
from __future__ import annotations

import numpy as np
import torch
from scipy import linalg


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor, eps: float = 1e-6) -> float:
    """‖μ_a − μ_b‖² + Tr(Σ_a + Σ_b − 2(Σ_a Σ_b)^½) between Gaussians fitted to (N, D) features
    (Heusel et al. 2017, computed on rlgen's own classifier features instead of Inception's)."""
    a = feats_a.double().cpu().numpy()
    b = feats_b.double().cpu().numpy()
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"features must be (N, D) with equal D, got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError("Fréchet distance needs at least 2 samples per set")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean, _ = linalg.sqrtm(cov_a @ cov_b, disp=False)
    if not np.isfinite(covmean).all():  # near-singular covariances: regularise as in the FID reference code
        off = np.eye(len(cov_a)) * eps
        covmean = linalg.sqrtm((cov_a + off) @ (cov_b + off))
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean))


def mean_pairwise_distance(feats: torch.Tensor) -> float:
    """Within-set diversity: mean Euclidean distance over distinct pairs of (N, D) features."""
    n = len(feats)
    if n < 2:
        return 0.0
    d = torch.cdist(feats.double(), feats.double())  # (N, N)
    return float(d.sum() / (n * (n - 1)))
