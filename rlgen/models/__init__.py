"""Generators rlgen trains: flow backbones + prompt encoders (flow.py), masked-diffusion LMs
(masked_lm.py). Every model folder holds ``rlgen_model.json`` naming its ``model_type``, a key of
the MODELS registry whose class implements ``save_pretrained(dir)`` / ``from_pretrained(dir, device)``.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

MODEL_META = "rlgen_model.json"


class ModelLoadError(RuntimeError):
    pass


@contextlib.contextmanager
def quiet_hf_progress():
    """transformers draws a progress bar per save/load; checkpoints every minute make that noise."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def read_model_meta(path: str | Path) -> dict:
    p = Path(path) / MODEL_META
    if not p.is_file():
        raise ModelLoadError(f"{Path(path)}: no {MODEL_META}; not an rlgen model folder")
    try:
        meta = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{p}: corrupt JSON ({e})") from e
    if not isinstance(meta, dict) or "model_type" not in meta:
        raise ModelLoadError(f"{p}: missing 'model_type'")
    return meta


def load_model(path: str | Path, device: str = "cpu", **options):
    """Load a policy from an rlgen checkpoint folder or a run folder (→ latest checkpoint).

    ``options`` (``trust_remote_code``, ``dtype``, a family's load options …) go to the model
    class's ``from_pretrained`` where it takes them; ``trust_remote_code`` only ever comes from
    the caller, never from a file in the folder.
    """
    import inspect

    from rlgen.registry import MODELS
    from rlgen.runtime.rundir import CheckpointError, resolve_checkpoint

    try:
        ckpt = resolve_checkpoint(path)
    except CheckpointError as e:  # a missing or empty folder is a model that cannot load
        raise ModelLoadError(str(e)) from e
    meta = read_model_meta(ckpt)
    try:
        cls = MODELS.get(meta["model_type"])
    except Exception as e:  # RegistryError, or an import error of a 'module:attr' model type
        raise ModelLoadError(f"{ckpt / MODEL_META}: model_type {meta['model_type']!r}: {e}") from e
    params = inspect.signature(cls.from_pretrained).parameters
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs = {k: v for k, v in options.items() if v is not None and (takes_all or k in params)}
    try:
        return cls.from_pretrained(ckpt, device=device, **kwargs)
    except ModelLoadError:
        raise
    except Exception as e:  # safetensors, transformers and diffusers raise many types for a bad file
        raise ModelLoadError(f"{ckpt}: cannot load {meta['model_type']} model: {type(e).__name__}: {e}") from e


def detect_family(path: str | Path) -> str:
    """The model family of a folder, from its metadata files alone (no weights are read)."""
    from rlgen.registry import MODELS
    from rlgen.runtime.rundir import CheckpointError, resolve_checkpoint

    try:
        ckpt = resolve_checkpoint(path)
    except CheckpointError as e:
        raise ModelLoadError(str(e)) from e
    meta = read_model_meta(ckpt)
    try:
        cls = MODELS.get(meta["model_type"])
    except Exception as e:
        raise ModelLoadError(f"{ckpt / MODEL_META}: model_type {meta['model_type']!r}: {e}") from e
    family = getattr(cls, "family", None)
    if family is None:
        raise ModelLoadError(f"{ckpt}: {meta['model_type']} models are not policies of a trainable family")
    return family
