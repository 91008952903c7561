"""rlgen: reinforcement-learning post-training for flow-matching and masked-diffusion generators."""
from rlgen._compat import patch_torchvision as _patch_torchvision

_patch_torchvision()

__version__ = "0.1.0"
