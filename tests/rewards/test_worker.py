"""RewardWorker: the local worker, and the Ray actor on a small local cluster (success + error)."""
import tempfile

import numpy as np
import pytest
import torch

from rewards.base import RewardError
from rewards.clip_score import ClipScore
from rewards.worker import LocalRewardWorker, _as_samples, make_reward_worker
from rlgen.data.shapes import make_batch

CFG = {"rewards": {"shapes_verifier": 1.0, "clip_score": 0.5}}


def test_numpy_samples_are_wrapped_without_a_copy():
    arr = np.zeros((2, 3, 4, 4), dtype=np.float32)
    arr.setflags(write=False)  # as Ray hands out object-store arrays
    t = _as_samples(arr)
    assert isinstance(t, torch.Tensor) and t.data_ptr() == arr.ctypes.data
    assert _as_samples(["a", "b"]) == ["a", "b"]


@pytest.mark.filterwarnings("ignore:invalid value encountered in cast")  # shapes_verifier on NaN pixels
def test_local_worker_scores_and_names_errors():
    images, prompts, _ = make_batch(np.random.default_rng(0), 4)
    worker = LocalRewardWorker(CFG)
    out = worker.score(images.numpy(), prompts)
    clip = ClipScore()(images, prompts)
    # ground-truth renders pass the verifier (1.0 each); the total is 1.0 + 0.5 · CLIP score
    torch.testing.assert_close(out.total, 1.0 + 0.5 * clip)
    assert worker.names() == ["shapes_verifier", "clip_score"]
    bad = images.clone()
    bad[1] = float("nan")  # a diverged generator: CLIP's embedding of it is NaN
    with pytest.raises(RewardError, match=rf"reward 'clip_score' returned nan for sample 1 \(prompt '{prompts[1]}'\)"):
        worker.score(bad, prompts)


def test_ray_reward_worker_success_and_error_reach_the_driver():
    import ray

    images, prompts, _ = make_batch(np.random.default_rng(1), 6)
    expected = LocalRewardWorker(CFG).score(images, prompts).total
    tmp = tempfile.mkdtemp(prefix="rlgen_ray_", dir="/tmp")  # Ray's socket paths must stay short
    # RAY_AUTH_MODE=disabled comes from tests/conftest.py
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=tmp, log_to_driver=False)
    try:
        worker = make_reward_worker(CFG, num_cpus=1)
        ref = worker.score.remote(images.numpy(), prompts, None)  # returns at once: an ObjectRef
        out = ray.get(ref, timeout=120)
        torch.testing.assert_close(out.total, expected)
        assert out.valid.all() and set(out.components) == {"shapes_verifier", "clip_score"}
        bad = images.numpy().copy()
        bad[4] = np.nan
        with pytest.raises(Exception) as e:
            ray.get(worker.score.remote(bad, prompts, None), timeout=120)
        msg = str(e.value)
        assert "reward 'clip_score' returned nan for sample 4" in msg and repr(prompts[4]) in msg
        assert isinstance(e.value, RewardError)  # Ray re-raises it as a subclass of the original
    finally:
        ray.shutdown()
