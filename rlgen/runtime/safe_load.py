"""Loading DeepSpeed checkpoints without unpickling arbitrary Python objects.

DeepSpeed reads every checkpoint file through its engine's ``checkpoint_engine.load``, whose
default (``TorchCheckpointEngine``) calls ``torch.load(weights_only=False)``: a crafted
``deepspeed/**/*.pt`` in a folder given to ``run.resume`` would run its code on every learner.
:func:`load_checkpoint` swaps in a checkpoint engine whose ``load`` is ``torch.load(weights_only=True)``
with exactly the classes DeepSpeed's own checkpoints hold allowed (listed by
``torch.serialization.get_unsafe_globals_in_checkpoint`` on ZeRO 0-3 checkpoints of DeepSpeed 0.19:
a tensor-fragment record, the loss scaler and the ZeRO stage enum; everything else is tensors,
containers, numbers and strings, which ``weights_only`` allows anyway). Anything else in a file is
refused with :class:`UnsafeCheckpointError` naming the file, before any of it is built.

:func:`check_checkpoint_files` does the same check without loading (it reads the pickle opcodes
only), for a driver that wants to refuse a bad ``run.resume`` folder before it starts any actor.
"""
from __future__ import annotations

import contextlib
from pathlib import Path


class UnsafeCheckpointError(ValueError):
    """A checkpoint file holds Python objects outside the allowed types (never unpickled)."""


def _allowed_globals() -> list:
    """The non-tensor classes DeepSpeed's ZeRO 0-3 (fp32, fp16, bf16) checkpoints contain."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [fragment_address, LossScaler, DynamicLossScaler, ZeroStageEnum]


def _names(classes: list) -> set[str]:
    return {f"{c.__module__}.{c.__qualname__}" for c in classes}


def safe_torch_load(path, map_location=None):
    """``torch.load(path, weights_only=True)`` with DeepSpeed's checkpoint classes allowed; a file
    that needs anything else raises :class:`UnsafeCheckpointError` naming it (nothing executed)."""
    import pickle

    import torch

    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message is a page of advice; keep its one line naming what the file asked for
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        reason = next((ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln), lines[0] if lines else "")
        reason = reason.split(". Please use")[0]
        raise UnsafeCheckpointError(f"{path}: refusing to load a checkpoint file that holds Python objects "
                                    f"other than tensors and DeepSpeed's checkpoint types ({reason[:200]})") from None


def check_checkpoint_files(folder) -> None:
    """Raise :class:`UnsafeCheckpointError` for the first ``*.pt`` under ``folder`` that references
    a global outside the allowed set (read from the pickle opcodes; nothing is built)."""
    import torch

    allowed = _names(_allowed_globals())
    for path in sorted(Path(folder).rglob("*.pt")):
        try:
            unsafe = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(str(path)) if g not in allowed]
        except Exception as e:  # not a torch zip file (a bare pickle, truncated, …)
            raise UnsafeCheckpointError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: "
                                        f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
        if unsafe:
            raise UnsafeCheckpointError(f"{path}: refusing to load a checkpoint file that references "
                                        f"{', '.join(sorted(unsafe)[:3])}: not a type DeepSpeed checkpoints hold")


def _weights_only_engine(base):
    """A checkpoint engine like ``base`` (saves the same way) whose ``load`` is weights-only."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def __init__(self):  # share the wrapped engine's settings (serialization format etc.)
            self.__dict__.update(base.__dict__)

        def load(self, path: str, map_location=None):
            return safe_torch_load(path, map_location)

    return WeightsOnlyCheckpointEngine()


@contextlib.contextmanager
def weights_only_loading(engine):
    """While the block runs, ``engine`` (a DeepSpeedEngine) reads checkpoints weights-only."""
    before = engine.checkpoint_engine
    engine.checkpoint_engine = _weights_only_engine(before)
    try:
        yield engine
    finally:
        engine.checkpoint_engine = before


def load_checkpoint(engine, load_dir, tag: str, **kwargs):
    """``engine.load_checkpoint(load_dir, tag, **kwargs)`` without unpickling arbitrary objects."""
    with weights_only_loading(engine):
        return engine.load_checkpoint(str(load_dir), tag=tag, **kwargs)
