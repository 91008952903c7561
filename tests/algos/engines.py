"""Engines and contexts for running an algorithm's ``update`` in one process, in unit tests."""
from __future__ import annotations

import contextlib
import math

import torch

from rlgen.algos.base import LearnerContext
from rlgen.runtime.engine import OptimConfig, TorchEngine


class RecordingEngine:
    """The engine surface, but ``step`` only records the accumulated gradient (weights never move)."""

    def __init__(self, module):
        self.module, self.grads = module, []
        self.params = list(module.parameters())

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss):
        loss.backward()

    def step(self) -> float:
        self.grads.append([None if p.grad is None else p.grad.clone() for p in self.params])
        norm = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in self.params if p.grad is not None))
        for p in self.params:
            p.grad = None
        return norm


def context(policy, engine, ref=None, teacher=None, micro: int = 0, lora: bool = False) -> LearnerContext:
    """A learner context: the reference is ``ref`` (a frozen copy) or, under LoRA, the adapter-disabled policy."""
    from rlgen.families import family_of

    def reference():
        if lora:
            return family_of(policy).adapters_disabled(policy)
        if ref is None:
            raise ValueError("no reference in this test")
        return contextlib.nullcontext(ref)

    return LearnerContext(policy, engine, reference, teacher, 0, 1, micro)


def adamw(module, lr=1e-2, grad_clip=0.0) -> TorchEngine:
    return TorchEngine(module, OptimConfig(lr=lr, grad_clip=grad_clip))
