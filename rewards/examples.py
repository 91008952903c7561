"""Example rewards (the entry-point route in pyproject.toml points here)."""

def constant_half(samples, prompts, **meta):
    """A trivial reward used to demonstrate/test entry-point discovery: 0.5 for every sample."""
    return [0.5] * len(prompts)



def brightness(samples, prompts, **meta):
    """Mean pixel value in [-1, 1] of each image: a dense toy reward (every sample scores differently),
    handy for smoke tests and for checking that RL moves a model at all."""
    import torch

    x = samples if isinstance(samples, torch.Tensor) else torch.as_tensor(samples)
    return x.float().flatten(1).mean(1).tolist()
