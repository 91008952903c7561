import numpy as np
import torch

from rlgen.eval.metrics import frechet_distance, mean_pairwise_distance


def test_fd_of_a_set_against_itself_is_zero_and_grows_with_noise():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(500, 8, generator=g) @ torch.randn(8, 8, generator=g)
    assert abs(frechet_distance(feats, feats)) < 1e-6
    fds = [frechet_distance(feats, feats + s * torch.randn(feats.shape, generator=g)) for s in (0.1, 0.5, 1.0, 2.0)]
    assert all(a < b for a, b in zip(fds, fds[1:])), fds


def test_fd_matches_closed_form_for_gaussians():
    # Two isotropic Gaussians: FD = |mu_a - mu_b|^2 + D (s_a - s_b)^2 for covariances s^2 I.
    g = torch.Generator().manual_seed(1)
    a = torch.randn(200000, 3, generator=g)
    b = 2.0 * torch.randn(200000, 3, generator=g) + torch.tensor([1.0, 0.0, 0.0])
    assert abs(frechet_distance(a, b) - (1.0 + 3 * (1 - 2) ** 2)) < 0.05


def test_diversity():
    x = torch.ones(10, 4)
    assert mean_pairwise_distance(x) == 0.0
    pts = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    assert np.isclose(mean_pairwise_distance(pts), 5.0)
