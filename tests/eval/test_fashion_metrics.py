"""The Fashion-MNIST benchmark's per-class report, on hand-made features with known answers.

A fake classifier reads its 16 features straight from the first 16 pixels and its 10 logits from
the first 10 features, so each test sets features (and therefore FD, diversity and accuracy) by hand.
"""
import math

import pytest
import torch

from rlgen.data import fashion_mnist as fm
from rlgen.eval.fashion_mnist import FashionReference

pytestmark = pytest.mark.usefixtures("one_thread")
D = 16


class PixelFeatures(torch.nn.Module):
    def features(self, x):          # (N, 1, 28, 28) → (N, 16)
        return x.flatten(1)[:, :D]

    def head(self, f):              # (N, 16) → (N, 10): logits are the first 10 features
        return f[:, :10] * 10.0


def images_from(feats: torch.Tensor) -> torch.Tensor:
    x = torch.zeros(len(feats), 1, 28, 28)
    x.view(len(feats), -1)[:, :D] = feats
    return x


def real_set(per_class=200, classes=(0, 1, 2), seed=0):
    """Features: one-hot class in dims 0..9 (so the fake classifier is right), Gaussian dims 10..15."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor([c for c in classes for _ in range(per_class)])
    f = torch.zeros(len(labels), D)
    f[torch.arange(len(labels)), labels] = 1.0
    f[:, 10:] = torch.randn(len(labels), D - 10, generator=g) + labels[:, None].float()
    return f, labels


def test_samples_equal_to_real_have_zero_fd_and_real_diversity():
    f, y = real_set()
    ref = FashionReference(PixelFeatures(), images_from(f), y)
    r = ref.report(images_from(f), y)
    assert r["n"] == 600 and r["n_per_class"] == {"t-shirt": 200, "trouser": 200, "pullover": 200}
    assert r["accuracy"] == 1.0
    assert abs(r["fd"]) < 1e-6 and all(abs(v) < 1e-6 for v in r["fd_per_class"].values())
    assert r["diversity"] == pytest.approx(r["diversity_real"])
    assert r["real_n"] == 600


def test_fd_per_class_is_the_squared_mean_shift_and_grows_with_noise():
    f, y = real_set()
    ref = FashionReference(PixelFeatures(), images_from(f), y)
    shifted = f.clone()
    shifted[y == 1, 10:13] += torch.tensor([2.0, 1.0, 2.0])   # same covariance, mean moved by |(2,1,2)|² = 9
    r = ref.report(images_from(shifted), y)
    assert r["fd_per_class"]["trouser"] == pytest.approx(9.0, abs=1e-6)
    assert abs(r["fd_per_class"]["t-shirt"]) < 1e-6 and abs(r["fd_per_class"]["pullover"]) < 1e-6
    assert r["accuracy"] == 1.0                              # dims 0..9 untouched: still the right class
    g = torch.Generator().manual_seed(1)
    fds = []
    for s in (0.1, 0.5, 1.0, 2.0):
        noisy = f.clone()
        noisy[:, 10:] += s * torch.randn(len(f), D - 10, generator=g)
        fds.append(ref.report(images_from(noisy), y)["fd"])
    assert all(a < b for a, b in zip(fds, fds[1:])), fds


def test_identical_samples_have_zero_diversity_and_accuracy_is_per_class():
    f, y = real_set()
    ref = FashionReference(PixelFeatures(), images_from(f), y)
    # class 0: four copies of one sample, three of them classified as class 1; class 2: two copies, right
    one = torch.zeros(D); one[0] = 1.0
    wrong = torch.zeros(D); wrong[1] = 1.0; wrong[10:] = 0.3    # a different point (diversity > 0)
    samples = torch.stack([one, wrong, wrong, wrong, f[y == 2][0], f[y == 2][0]])
    labels = torch.tensor([0, 0, 0, 0, 2, 2])
    r = ref.report(images_from(samples), labels)
    assert r["per_task"] == {"t-shirt": 0.25, "pullover": 1.0} and r["accuracy"] == pytest.approx(3 / 6)
    assert r["n_per_class"] == {"t-shirt": 4, "pullover": 2}
    assert r["diversity_per_class"]["pullover"] == 0.0
    # t-shirt: 3 of the 6 distinct pairs are (one, wrong) at distance |(1,-1,0..)| + 6 dims of 0.3
    d = math.sqrt(2 + 6 * 0.3 ** 2)
    assert r["diversity_per_class"]["t-shirt"] == pytest.approx(3 * d / 6)
    ident = torch.stack([f[0]] * 5)
    r = ref.report(images_from(ident), torch.zeros(5, dtype=torch.long))
    assert r["diversity"] == 0.0 and r["diversity_real"] > 0.5


def test_fd_floor_is_zero_when_the_pool_is_the_test_set_itself():
    f, y = real_set(per_class=50)
    ref = FashionReference(PixelFeatures(), images_from(f), y, pool=images_from(f), pool_labels=y)
    r = ref.report(images_from(f + 0.5), y)
    assert abs(r["fd_floor"]) < 1e-6 and r["fd"] > 0.1
    # a smaller draw from the same distribution lands above zero: the small-n bias the floor shows
    r = ref.report(images_from(f[::5]), y[::5])
    assert r["fd_floor"] > 0.0


@pytest.mark.slow
def test_real_test_split_scored_as_samples_matches_the_classifier_record():
    try:
        ref = FashionReference.load(with_floor=False)
    except fm.DatasetMissingError:
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    x, y = fm.FashionMNIST("test").tensors()
    r = ref.report(x, y)
    # eval.json recorded the test accuracy when the classifier was trained: an independent number
    assert r["accuracy"] == pytest.approx(ref.test_accuracy, abs=1e-3)
    assert abs(r["fd"]) < 1e-4 and r["diversity"] == pytest.approx(r["diversity_real"])
    assert r["n"] == 10000 and set(r["n_per_class"].values()) == {1000}


def test_clip_accuracy_on_real_images_matches_the_clip_record():
    """The shipped Fashion CLIP recorded its image→text retrieval among all ten class prompts on
    1000 test images (eval.json); zero-shot accuracy on the same images must be that number."""
    import json
    from pathlib import Path

    from rlgen.eval.fashion_mnist import clip_accuracy

    ckpt = Path(__file__).resolve().parents[2] / "rlgen" / "assets" / "clip_fashion_mnist"
    record = json.loads((ckpt / "eval.json").read_text())
    try:
        x, y = fm.FashionMNIST("test", size=record["n"], seed=10_000).tensors()  # ClipData.eval_seed
    except fm.DatasetMissingError:
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    r = clip_accuracy(x, y, str(ckpt))
    assert r["clip_accuracy"] == pytest.approx(record["image_to_text"], abs=2e-3)
    assert set(r["clip_accuracy_per_class"]) == set(fm.CLASSES)
