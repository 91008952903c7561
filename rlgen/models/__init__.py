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


def load_model(path: str | Path, device: str = "cpu", dtype=None, trust_remote_code: bool = False,
               **family_options):
    """Load a policy of the right family from a path or a Hugging Face Hub id:

    - an rlgen checkpoint folder (``rlgen_model.json``) or run folder (→ its latest checkpoint);
    - a diffusers pipeline folder (``model_index.json``) → ``DiffusersFlowPolicy`` (family ``flow``);
    - a Hugging Face model folder (``config.json``) → ``MaskedDiffusionLM`` (family ``masked_lm``);
    - a Hub id (``org/name``) that is not a local path: resolved through the local Hugging Face cache,
      downloaded where a network exists; offline, a one-line error naming the id.

    ``dtype`` and ``family_options`` (e.g. ``resolution=``, ``max_sequence_length=`` for pipelines) go to
    the family's loader; ``trust_remote_code`` comes only from the caller, never from a file.
    """
    from rlgen.registry import MODELS
    from rlgen.runtime.rundir import CheckpointError, resolve_checkpoint

    src = resolve_source(path)
    if src.kind == "diffusers":
        from rlgen.models.diffusers_flow import DiffusersFlowPolicy

        return DiffusersFlowPolicy.from_pipeline_dir(src.path, device=device, dtype=dtype, base=src.name,
                                                     **family_options)
    if src.kind == "hf":
        from rlgen.models.masked_lm import MaskedDiffusionLM

        kw = _accepted(MaskedDiffusionLM.from_hf, {"dtype": dtype, "trust_remote_code": trust_remote_code,
                                                   **family_options})
        return MaskedDiffusionLM.from_hf(src.path, device=device, **kw)
    try:
        ckpt = resolve_checkpoint(src.path)
    except CheckpointError as e:  # a missing or empty folder is a model that cannot load
        raise ModelLoadError(str(e)) from e
    meta = read_model_meta(ckpt)
    try:
        cls = MODELS.get(meta["model_type"])
    except Exception as e:  # RegistryError, or an import error of a 'module:attr' model type
        raise ModelLoadError(f"{ckpt / MODEL_META}: model_type {meta['model_type']!r}: {e}") from e
    kw = _accepted(cls.from_pretrained, {"dtype": dtype, **family_options})
    try:
        return cls.from_pretrained(ckpt, device=device, **kw)
    except ModelLoadError:
        raise
    except Exception as e:  # safetensors, transformers and diffusers raise many types for a bad file
        raise ModelLoadError(f"{ckpt}: cannot load {meta['model_type']} model: {type(e).__name__}: {e}") from e


def _accepted(fn, kwargs: dict) -> dict:
    """The kwargs ``fn`` takes (all of them if it has **kwargs); None values are dropped."""
    import inspect

    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return {k: v for k, v in kwargs.items() if v is not None}
    return {k: v for k, v in kwargs.items() if k in params and v is not None}


from rlgen.models.sources import ModelSource, resolve_source  # noqa: E402,F401  (after ModelLoadError)
