"""Checks a job runs before anything starts: each failure is one line naming the key, file or folder.

Nothing here writes into the run folder; the only thing that may be written is an explicitly
requested artefact (a missing base pretrained with ``policy.pretrain_config``, missing pairs built
with ``pairs.build``), each into its own folder.
"""
from __future__ import annotations

from pathlib import Path

from rlgen.config import ConfigError, load_config, yaml_load


def base_checkpoint(policy_cfg, cfg=None) -> Path:
    """The starting policy's folder; a missing one is pretrained only when the config asks to: with a
    ``policy.pretrain_config`` set in the same place (file, or command line) as the checkpoint, so a
    mistyped ``policy.checkpoint=…`` on the command line is an error, not a new pretraining."""
    from rlgen.config import origin_of
    from rlgen.runtime.rundir import resolve_checkpoint

    p = Path(policy_cfg.checkpoint)
    if not p.exists() and not policy_cfg.pretrain_config and hub_id(policy_cfg.checkpoint):
        return hub_base(policy_cfg)
    if not p.exists():
        if not policy_cfg.pretrain_config:
            raise ConfigError(f"policy.checkpoint: {p} not found (give an existing checkpoint, run, diffusers or "
                              f"Hugging Face folder, or a Hub id; or set policy.pretrain_config to pretrain a "
                              f"missing base)")
        ck, pre = (origin_of(cfg, f"policy.{k}") for k in ("checkpoint", "pretrain_config"))
        if ck != pre:
            raise ConfigError(f"policy.checkpoint: {p} not found (set in {ck}); policy.pretrain_config (set in "
                              f"{pre}) pretrains only the base that {pre} names: to pretrain a new base at {p}, "
                              f"set policy.pretrain_config there too")
        pretrain_base(p, policy_cfg.pretrain_config, policy_cfg.pretrain_overrides)
    if (p / "model_index.json").is_file():  # a diffusers pipeline: its options are checked before any actor loads it
        from rlgen.models import check_load_options

        check_load_options("diffusers", policy_cfg.options, str(p))
        return p
    if (p / "config.json").is_file() and not (p / "rlgen_model.json").is_file():
        return p  # a Hugging Face model folder
    return resolve_checkpoint(p)


def hub_id(spec: str) -> bool:
    from rlgen.models.sources import _HUB_ID

    return bool(_HUB_ID.match(spec))


def hub_base(policy_cfg) -> Path:
    """A Hub id as the starting policy: fetched into the local cache now (where a network exists), so the
    actors (on nodes sharing that cache) load it from there. The id itself is what they get, and what
    checkpoints record as their base: portable, unlike a cache path."""
    from rlgen.models import ModelLoadError, check_load_options
    from rlgen.models.sources import resolve_source

    try:
        src = resolve_source(policy_cfg.checkpoint)
    except ModelLoadError as e:
        raise ConfigError(f"policy.checkpoint: {e}") from None
    check_load_options(src.kind, policy_cfg.options, policy_cfg.checkpoint)
    return Path(policy_cfg.checkpoint)


def pretrain_base(p: Path, config: str, overrides: list[str]) -> None:
    from rlgen.pretrain.loop import run_pretraining
    from rlgen.registry import PRETRAINERS

    print(f"[rlgen] base model {p} not found: pretraining it with {config}")
    pcfg = load_config(config, [f"run.root={p.parent}", f"run.name={p.name}", "run.resume=auto", *overrides])
    run_pretraining(pcfg, PRETRAINERS.get(pcfg.kind)(pcfg))


def policy_family(base: Path, algo) -> str:
    """The base's model family, which must be the one the algorithm trains."""
    from rlgen.models import detect_family

    family = detect_family(base)
    if family != algo.family:
        raise ConfigError(f"policy.checkpoint: {base} holds a {family} model, but algo.name={algo.name} trains "
                          f"{algo.family} models")
    return family


def precision_note(cfg) -> str | None:
    """``policy.dtype`` is a CUDA setting: the one line saying which roles of this job compute in float32
    instead (no GPU: CPU kernels in half precision are slow and CPU training is the test bed)."""
    c, r = cfg, cfg.resources
    if c.policy.dtype == "float32":
        return None
    roles = (("rollout workers", r.rollout_gpus, c.run.device), ("learners", r.learner_gpus, ""))
    cpu = [role for role, gpus, dev in roles if gpus == 0 or dev == "cpu"]
    if c.policy.dtype == "float16" and "learners" not in cpu:
        return ("policy.dtype=float16: rollout workers sample in float16, learners train in float32 (use bfloat16 "
                "for bf16 compute with fp32 master weights in DeepSpeed)")
    if cpu:
        return (f"policy.dtype={c.policy.dtype} applies on CUDA only: this job's {' and '.join(cpu)} have no GPU "
                f"(resources.*_gpus=0 or run.device=cpu) and compute in float32")
    return None


def check_eval_files(e) -> None:
    """Read the eval's prompts/problems files now (a bad line is an error before anything starts)."""
    from rlgen.evaluate import EvalRequest
    from rlgen.registry import BENCHMARKS

    fn = BENCHMARKS.get(e.benchmark)
    req = EvalRequest(prompts=Path(e.prompts) if e.prompts else None, problems=Path(e.problems) if e.problems else None,
                      options=dict(e.options), samples_per_prompt=e.samples_per_prompt or None)
    getattr(fn, "prepare", lambda r: None)(req)


def check_resume(cfg, family: str) -> Path | None:
    """The checkpoint to resume from, after checking it belongs to this kind of job."""
    from rlgen.runtime.rundir import CheckpointError, find_latest_checkpoint, resolve_checkpoint

    mode = cfg.run.resume
    if mode == "no":
        return None
    if mode == "auto":
        ckpt = find_latest_checkpoint(cfg.run.dir)
        _check_run_folder(cfg.run.dir, cfg, family)
    else:
        p = Path(mode)
        if not p.is_dir():
            raise ConfigError(f"run.resume: {p} is not a checkpoint or run folder")
        ckpt = resolve_checkpoint(p) if (p / "checkpoints").is_dir() or (p / "COMPLETE").is_file() else None
        if ckpt is None:
            raise CheckpointError(f"run.resume: {p} is neither a complete checkpoint nor a run folder")
    if ckpt is not None:
        from rlgen.runtime.safe_load import check_checkpoint_files

        _check_checkpoint(ckpt, cfg, family)
        check_checkpoint_files(ckpt / "deepspeed")  # only DeepSpeed's own types: a crafted pickle is refused now
    return ckpt


def _check_run_folder(run_dir: Path, cfg, family: str) -> None:
    """A run folder written by another kind of job (another algorithm's family, pretraining) is refused."""
    saved = Path(run_dir) / "config.yaml"
    if not saved.is_file():
        return
    try:
        data = yaml_load(saved.read_text(encoding="utf-8")) or {}
    except Exception as e:  # noqa: BLE001 — a damaged file is a refusal too
        raise ConfigError(f"run.resume=auto: {saved} is unreadable ({type(e).__name__}); not resuming into it") from e
    _same_job(data, saved, cfg, family)


def _check_checkpoint(ckpt: Path, cfg, family: str) -> None:
    import json

    state = ckpt / "driver_state.json"
    if not state.is_file():
        raise ConfigError(f"run.resume: {ckpt} holds no driver_state.json: not a checkpoint of a train_rl.py job "
                          f"(a pretraining checkpoint is a starting point: policy.checkpoint={ckpt})")
    data = json.loads(state.read_text())
    if data.get("family", family) != family or data.get("algo", cfg.algo.name) != cfg.algo.name:
        raise ConfigError(f"run.resume: {ckpt} is a checkpoint of {data.get('algo')} on a {data.get('family')} model; "
                          f"this job is {cfg.algo.name} on a {family} model (use another run.name)")


def _same_job(data: dict, where: Path, cfg, family: str) -> None:
    kind = data.get("kind", "train")
    algo = (data.get("algo") or {}).get("name") if isinstance(data.get("algo"), dict) else None
    if kind != "train" or (algo and algo != cfg.algo.name):
        what = f"a {kind} run" if kind != "train" else f"a {algo} run"
        raise ConfigError(f"run.resume=auto: {where.parent} holds {what}; this job is {cfg.algo.name} "
                          f"(use another run.name, or run.resume=no to move the old run aside)")


def load_pair_set(cfg, base: Path, modality: str):
    """The validated pairs (built first from the base when missing and ``pairs.build`` asks to)."""
    from rlgen.data.pairs import load_pairs

    c = cfg.pairs
    p = Path(c.path)
    if not p.exists():
        if not c.build.rewards:
            raise ConfigError(f"pairs.path: {p} not found (set pairs.build.rewards to build the pairs from the base)")
        _build_pairs(cfg, base, p)
    pairs = load_pairs(p, modality, c.on_error, None, image_root=c.image_root or None)
    print(f"[rlgen] {pairs.summary()}")
    for e in pairs.errors[:5]:
        print(f"[rlgen]   skipped: {e}")
    return pairs


def _build_pairs(cfg, base: Path, p: Path) -> None:
    import argparse

    from rlgen.pairs import build

    b = cfg.pairs.build
    out = p.parent if p.suffix else p
    print(f"[rlgen] pairs {p} not found: building them from {base}")
    build(argparse.Namespace(
        checkpoint=str(base), reward=[f"{k}={v}" for k, v in b.rewards.items()], prompts=b.prompts,
        samples_per_prompt=b.samples_per_prompt, out=str(out), strategy=b.strategy, margin=b.margin, seed=b.seed,
        num_steps=b.num_steps, cfg=b.cfg, noise_level=b.noise_level, temperature=b.temperature, batch_size=64,
        sheet_pairs=16, device=cfg.run.device, threads=cfg.run.num_threads, progress=cfg.run.progress,
        options=cfg.policy.load_options(), reward_kwargs=dict(cfg.reward_kwargs)))


def check_teacher(algo, base: Path) -> None:
    """A teacher the algorithm names must exist, be of the student's family and (masked LMs) share
    its tokenizer and mask id: distillation compares distributions over the same token ids."""
    from rlgen.models import detect_family

    spec = algo.teacher()
    if spec is None or spec.kind != "policy":
        if spec is not None and not Path(spec.path).exists():
            raise ConfigError(f"algo.teacher: {spec.path} not found")
        return
    family = detect_family(spec.path)
    if family != algo.family:
        raise ConfigError(f"algo.teacher: {spec.path} holds a {family} model; the student is a {algo.family} model")
    if family == "masked_lm":
        from rlgen.models.hf_lm import token_identity

        t, s = token_identity(spec.path), token_identity(base)
        if None not in (t, s) and t != s:
            raise ConfigError(f"algo.teacher: {spec.path}: its tokenizer (or mask id) differs from the student's "
                              f"({base}); on-policy distillation compares distributions over the same token ids")
