"""A dense reward for end-to-end text jobs on random-weight models: every completion scores
differently (the fraction of its characters that are digits), so every group carries signal."""


def digit_fraction(completions, **kwargs) -> list[float]:
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [sum(ch.isdigit() for ch in t) / max(len(t), 1) for t in texts]
