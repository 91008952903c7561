import pytest
import torch

from rlgen.data import fashion_mnist as fm


def test_missing_dataset_error_says_how_to_install(tmp_path):
    fm.load_arrays.cache_clear()
    with pytest.raises(fm.DatasetMissingError, match="apt-get install dataset-fashion-mnist"):
        fm.FashionMNIST("train", root=str(tmp_path))


def test_prompt_round_trip_and_bad_prompt():
    for y in range(len(fm.CLASSES)):
        assert fm.class_from_prompt(fm.class_prompt(y)) == y
    with pytest.raises(ValueError, match="names no Fashion-MNIST class"):
        fm.class_from_prompt("a photo of a hat")


def test_classifier_reward_prefers_the_true_class():
    try:
        ds = fm.FashionMNIST("test", size=200, seed=0)
    except fm.DatasetMissingError:
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    from rewards.fashion_classifier import FashionClassifierReward

    x, y = ds.tensors()
    reward = FashionClassifierReward()
    right = torch.tensor(reward(x, [fm.class_prompt(int(c)) for c in y]))
    wrong = torch.tensor(reward(x, [fm.class_prompt((int(c) + 1) % 10) for c in y]))
    assert right.shape == (200,) and ((right >= 0) & (right <= 1)).all()
    # the shipped classifier has ~88% test accuracy: the true class should usually dominate
    assert right.mean() > 0.7 and wrong.mean() < 0.1
    with pytest.raises(ValueError, match="200 samples but 3 prompts"):
        reward(x, ["a photo of a bag"] * 3)
