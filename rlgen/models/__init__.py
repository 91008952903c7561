"""Generators rlgen trains: flow backbones + prompt encoders (flow.py), masked-diffusion LMs
(masked_lm.py, hf_lm.py for Hugging Face diffusion LMs, lora.py, diffusion_gemma.py). Every rlgen
model folder holds ``rlgen_model.json`` naming its ``model_type``, a key of the MODELS registry whose
class implements ``save_pretrained(dir)`` / ``from_pretrained(dir, device, ...)``; ``load_model``
also takes Hugging Face folders and Hub ids.
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


def refuse_remote_code(folder: Path) -> None:
    """Raise if the folder's Hugging Face config asks to run Python files shipped in it (``auto_map``):
    only the caller may allow that (``trust_remote_code``), never the folder itself."""
    for name in ("config.json", "tokenizer_config.json"):
        f = Path(folder) / name
        try:
            auto_map = json.loads(f.read_text()).get("auto_map") if f.is_file() else None
        except (OSError, ValueError, AttributeError):
            continue  # unreadable: the loader names the file
        if auto_map:
            refs = auto_map.values() if isinstance(auto_map, dict) else [auto_map]
            flat = [r for v in refs for r in (v if isinstance(v, list) else [v]) if isinstance(r, str)]
            code = sorted({r.split("--")[-1].split(".")[0] + ".py" for r in flat})
            raise ModelLoadError(f"{f}: the model needs the Python code shipped in its folder "
                                 f"({', '.join(code[:3]) or 'auto_map'}); rlgen runs none unless told to: set "
                                 f"policy.trust_remote_code=true (train_rl.py) or pass --trust-remote-code "
                                 f"(python -m rlgen.evaluate) only for a folder you trust")


def load_model(path: str | Path, device: str = "cpu", dtype=None, trust_remote_code: bool = False, **options):
    """Load a policy from an rlgen checkpoint or run folder (→ latest checkpoint), a Hugging Face
    model folder (``config.json``: masked-diffusion LMs, DiffusionGemma) or a Hub id (cache first).

    ``trust_remote_code`` comes only from the caller (a user's config or command line), never from
    a file in the folder. ``options`` are the family's typed options (for masked LMs the fields of
    ``rlgen.models.hf_lm.MaskedLMOptions``: ``mask_token_id``, ``attention``, ``lora`` …).
    """
    import inspect

    from rlgen.registry import MODELS
    from rlgen.runtime.rundir import CheckpointError, resolve_checkpoint

    given = dict(options)
    dtype = compute_dtype(dtype, device, given.pop("float32_on_cpu", False))
    if dtype is not None:
        given["dtype"] = dtype
    if trust_remote_code:
        given["trust_remote_code"] = True
    p = Path(path)
    if not (p.exists() and ((p / MODEL_META).is_file() or (p / "checkpoints").is_dir())):
        return _load_foreign(path, device, given)
    try:
        ckpt = resolve_checkpoint(path)
    except CheckpointError as e:  # a missing or empty folder is a model that cannot load
        raise ModelLoadError(str(e)) from e
    meta = read_model_meta(ckpt)
    try:
        cls = MODELS.get(meta["model_type"])
    except Exception as e:  # RegistryError, or an import error of a 'module:attr' model type
        raise ModelLoadError(f"{ckpt / MODEL_META}: model_type {meta['model_type']!r}: {e}") from e
    if not trust_remote_code:
        refuse_remote_code(ckpt)  # a folder never switches its own code on
    accepted = inspect.signature(cls.from_pretrained).parameters
    takes_all = any(v.kind is inspect.Parameter.VAR_KEYWORD for v in accepted.values())
    # a model class without a dtype argument (rlgen's small models) is loaded, then cast
    cast = given.pop("dtype", None) if "dtype" not in accepted and not takes_all else None
    extra = sorted(k for k in given if k not in accepted and not takes_all)
    if extra:
        raise ModelLoadError(f"{ckpt}: options {extra} do not apply to a {meta['model_type']!r} model")
    try:
        model = cls.from_pretrained(ckpt, device=device, **given)
        return model.to(cast) if cast is not None else model
    except ModelLoadError:
        raise
    except Exception as e:  # safetensors, transformers and diffusers raise many types for a bad file
        raise ModelLoadError(f"{ckpt}: cannot load {meta['model_type']} model: {type(e).__name__}: {e}") from e


_NOTED: set = set()  # one line per process for a dtype the device ignores


def compute_dtype(dtype, device, float32_on_cpu: bool = False):
    """``dtype`` (a name such as "bfloat16" or a torch.dtype; None = as stored) → a torch.dtype.

    ``float32_on_cpu`` (what a job config's ``policy.dtype`` asks for: PolicyConfig.load_options):
    the reduced precision applies on accelerators only; on a CPU device the policy computes in
    float32, said once per process. A direct ``load_model(..., dtype=...)`` call is always obeyed.
    """
    import torch

    from rlgen.models.hf_lm import torch_dtype

    dt = torch_dtype(dtype)
    if dt is None or not float32_on_cpu or str(device).split(":")[0] != "cpu" or dt == torch.float32:
        return dt
    if dt not in _NOTED:
        _NOTED.add(dt)
        print(f"[rlgen] policy.dtype={str(dt).removeprefix('torch.')} applies on GPUs only: this process computes "
              f"in float32 on the CPU", flush=True)
    return None


def _load_foreign(spec, device: str, options: dict):
    """A Hugging Face folder or Hub id: the family is read from its files."""
    from rlgen.models.hf_lm import resolve_model_path

    folder, source = resolve_model_path(spec)
    if (folder / MODEL_META).is_file():  # a Hub repo or cache entry that is an rlgen checkpoint
        return load_model(folder, device=device, **options)
    if (folder / "model_index.json").is_file():  # a diffusers pipeline: the flow family in latent space
        from rlgen.models.diffusers_flow import DiffusersFlowPolicy

        opts = {k: v for k, v in options.items() if k != "trust_remote_code"}
        return DiffusersFlowPolicy.from_pipeline_dir(folder, device=device, base=source, **opts)
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{folder}: neither an rlgen checkpoint ({MODEL_META}), a diffusers pipeline folder "
                             f"(model_index.json) nor a Hugging Face model folder (config.json)")
    config = json.loads((folder / "config.json").read_text())
    if config.get("model_type") == "diffusion_gemma":
        from rlgen.models.diffusion_gemma import DiffusionGemmaLM

        return DiffusionGemmaLM.load(folder, device=device, **options)
    from rlgen.models.hf_lm import MaskedLMOptions
    from rlgen.models.masked_lm import MaskedDiffusionLM

    MaskedLMOptions.from_kwargs(**options)  # a misspelt option fails here, named, before any loading
    try:
        return MaskedDiffusionLM.from_hf(folder, device=device, source=source, **options)
    except ModelLoadError:
        raise
    except Exception as e:  # transformers raises many types for a bad folder
        raise ModelLoadError(f"{folder}: cannot load as a masked-diffusion LM: {type(e).__name__}: {e}") from e


def check_load_options(kind: str, options: dict, where: str) -> None:
    """Refuse ``options`` the loader of a folder of ``kind`` ("diffusers": a pipeline) does not take, as
    one line naming them and the valid ones, before any actor loads the weights."""
    if kind == "diffusers":
        from rlgen.models.diffusers_flow import check_options

        check_options(options, where)


def detect_family(path: str | Path) -> str:
    """The model family of a folder, from its metadata files alone (no weights are read): an rlgen
    checkpoint names its model type; a diffusers pipeline folder is a flow model; a Hugging Face
    model folder is a masked-diffusion LM."""
    from rlgen.registry import MODELS
    from rlgen.runtime.rundir import CheckpointError, resolve_checkpoint

    p = Path(path)
    if not p.exists():  # a Hub id: its files in the local cache (rlgen.models.sources)
        from rlgen.models.sources import resolve_source

        src = resolve_source(str(path))
        if src.kind != "rlgen":
            return "flow" if src.kind == "diffusers" else "masked_lm"
        p = src.path
    if p.is_dir() and not (p / MODEL_META).is_file() and not (p / "checkpoints").is_dir():
        if (p / "model_index.json").is_file():
            return "flow"
        if (p / "config.json").is_file():
            return "masked_lm"
    try:
        ckpt = resolve_checkpoint(p)
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
