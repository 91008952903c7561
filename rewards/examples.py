"""Example rewards (the entry-point route in pyproject.toml points here)."""

def constant_half(samples, prompts, **meta):
    """A trivial reward used to demonstrate/test entry-point discovery: 0.5 for every sample."""
    return [0.5] * len(prompts)

