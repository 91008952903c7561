"""The ``masked_lm`` family: masked-diffusion LMs decoded by iterative unmasking.

Policies: rlgen's tiny LMs and Hugging Face diffusion LMs (``MaskedDiffusionLM``,
rlgen/models/masked_lm.py). Rollouts expand every prompt item G times, decode each
(prompt length, answer width) bucket as one padding-free batch with rlgen's masked sampler
(``rlgen.samplers.masked.generate``) and keep the decoding order the RL estimators replay.
"""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from rlgen.algos.mdm_grpo import banned_ids
from rlgen.batches import TextBucket, TextRollout
from rlgen.config import check_choice, check_range
from rlgen.families import Family, register_family
from rlgen.models.hf_lm import Conventions
from rlgen.samplers.masked import CACHE_MODES, REMASKING, generate


@dataclass
class TextRolloutConfig:
    """``rollout:`` of a masked-LM job: how training completions are decoded."""

    temperature: float = 1.0        # > 0: the G samples of a group must differ
    steps: int = 0                  # 0 = the answer width (one token per step)
    block_length: int = 0           # 0 = the whole answer is one block
    threshold: float | None = None  # confidence-threshold parallel decoding
    remasking: str = "low_confidence"
    batch_size: int = 256           # rows per generate call
    # key/value cache (rlgen/samplers/kv_cache.py): None = automatic (the exact block cache for
    # block-causal policies, none otherwise), "none", or Fast-dLLM's approximate "prefix" / "dual"
    # caches for bidirectional policies (samples then come from a slightly different policy than the
    # learners' full-forward log-probs)
    cache: str | None = None

    def __post_init__(self):
        check_range(self, "temperature", lo=0)
        check_range(self, "steps", lo=0)
        check_range(self, "block_length", lo=0)
        check_range(self, "threshold", lo=0, hi=1)
        check_range(self, "batch_size", lo=1)
        check_choice(self, "remasking", REMASKING)
        check_choice(self, "cache", CACHE_MODES)


def decode_settings(cfg: TextRolloutConfig, width: int, block_size: int | None = None) -> tuple[int, int]:
    """(block_length, steps) for an answer of ``width`` tokens. A block-causal policy decodes in the
    blocks it attends in (``block_size``), ``steps`` (a total over the answer) at the same density."""
    if block_size is not None:
        return block_size, min(cfg.steps or width, width)
    bl = min(cfg.block_length or width, width)
    if width % bl:
        bl = width  # a block size that does not divide this task's width: one block
    blocks = width // bl
    steps = min(cfg.steps or width, width)
    return bl, max(blocks, steps - steps % blocks)


@torch.no_grad()
def rollout_text(model, items: list[dict], group_ids: torch.Tensor, cfg: TextRolloutConfig,
                 generator: torch.Generator | None = None, version: int = 0) -> TextRollout:
    """One completion per item (callers repeat each prompt G times); items need ``prompt`` and
    ``gen_length`` (the answer width); their other keys travel as ``meta`` to the rewards. An item
    with ``messages`` (a dataset under a chat template) is decoded after the policy's own rendering
    of them, and its completion reaches rewards as a conversation turn (trl's convention).

    Prompts are never padded: rows are bucketed by (prompt length, answer width) and each bucket is
    one batch, so the log-prob replay on the learners needs no attention mask either."""
    from rlgen.data.text_dataset import apply_chat_template
    from rlgen.data.tokenizer import decode_completion, encode_batch

    tok = model.tokenizer
    prompts = [apply_chat_template(tok, it["messages"]) if "messages" in it else it["prompt"] for it in items]
    ids = encode_batch(tok, prompts)
    buckets = defaultdict(list)  # (P, G) → row indices
    for i, it in enumerate(items):
        buckets[(len(ids[i]), int(it["gen_length"]))].append(i)
    completions: list[str] = [""] * len(items)
    out = []
    was_training = model.training
    model.eval()
    for (P, width), rows in sorted(buckets.items()):
        bl, steps = decode_settings(cfg, width, getattr(model, "block_size", None))
        parts = []
        for s in range(0, len(rows), cfg.batch_size):
            chunk = rows[s:s + cfg.batch_size]
            prompt = torch.tensor([ids[i] for i in chunk], device=model.device)  # (b, P)
            # block-causal policies: rlgen/samplers/block.py with its exact prefix cache
            parts.append(generate(model, prompt, gen_length=width, steps=steps, block_length=bl,
                                  temperature=cfg.temperature, remasking=cfg.remasking, threshold=cfg.threshold,
                                  mask_id=model.mask_id, generator=generator, eos_id=model.eos_id,
                                  forbidden_ids=banned_ids(model), cache=cfg.cache))
        tokens = torch.cat([o.tokens for o in parts]).cpu()
        for i, r in zip(rows, tokens[:, P:].tolist()):
            text = decode_completion(tok, r)
            completions[i] = [{"role": "assistant", "content": text}] if "messages" in items[i] else text
        out.append(TextBucket(tokens, torch.cat([o.order for o in parts]).cpu(),
                              torch.cat([o.token_logprobs for o in parts]).float().cpu(), torch.tensor(rows), P))
    model.train(was_training)
    meta_keys = sorted({k for it in items for k in it} - {"prompt", "gen_length", "messages"})
    meta = {k: [it.get(k) for it in items] for k in meta_keys}
    return TextRollout(prompts, completions, group_ids.cpu(), out, meta, weights_version=version)


def policy_folder(policy_cfg) -> Path | None:
    """The folder ``policy.checkpoint`` loads from (a run folder → its newest checkpoint); None when
    it does not exist yet (set-up pretrains it or names it)."""
    from rlgen.runtime.rundir import resolve_checkpoint

    from rlgen.models import ModelLoadError
    from rlgen.models.sources import resolve_source
    from rlgen.runtime.setup import hub_id

    p = Path(policy_cfg.checkpoint)
    if not p.exists():
        if not hub_id(str(policy_cfg.checkpoint)):
            return None
        try:  # a Hub id: its snapshot in the local cache, so the same checks read the same files
            return resolve_source(policy_cfg.checkpoint).path
        except ModelLoadError:
            return None  # set-up names the id and the cache
    return resolve_checkpoint(p) if (p / "checkpoints").is_dir() else p


def check_masked_lm_job(job) -> Conventions | None:
    """Set-up checks of a masked-LM job that need the policy folder's metadata (never its weights or
    code): remote code needs the caller's flag, rollout blocks of a block-causal policy, a dataset's columns
    and chat template. Returns the policy's conventions (None when the folder is not there yet or holds no
    model metadata: set-up names it)."""
    from rlgen.algos.base import get_algorithm
    from rlgen.models.hf_lm import check_remote_code, read_conventions

    folder = policy_folder(job.policy)
    if folder is not None:  # the folder's own code (or a LoRA checkpoint's base's) needs the caller's flag
        base = Path(json.loads((folder / "rlgen_model.json").read_text()).get("lora_base") or folder) \
            if (folder / "rlgen_model.json").is_file() else folder
        for f in {folder, base} if base.is_dir() else {folder}:
            check_remote_code(f, job.policy.trust_remote_code)
    has_meta = folder is not None and ((folder / "rlgen_model.json").is_file() or (folder / "config.json").is_file())
    if has_meta and job.policy.mask_token_id is None:
        from rlgen.models.hf_lm import token_identity

        ident = token_identity(folder)  # None: no tokenizer.json to read (the load names a missing mask)
        tok_cfg = folder / "tokenizer_config.json"
        named = tok_cfg.is_file() and bool(json.loads(tok_cfg.read_text()).get("mask_token"))
        # a tokenizer may add its mask token in its own code (Dream): a named one is resolved at load
        if ident is not None and ident[1] is None and not named:
            raise ValueError(f"{folder}: no mask token: the tokenizer has none and config.json has no mask_token_id; "
                             f"set policy.mask_token_id=<id>")
    conv = read_conventions(folder, **job.policy.load_options()) if has_meta else None
    if conv is not None and conv.attention == "block_causal" and job.rollout.block_length not in (0, conv.block_size):
        raise ValueError(f"rollout.block_length={job.rollout.block_length} differs from the block size the policy "
                         f"attends in ({conv.block_size}); a block-causal policy decodes in its own blocks: leave "
                         f"rollout.block_length=0 (or set policy.lm.block_size)")
    if get_algorithm(job.algo.name).data == "rollouts":
        from rlgen.runtime.sources import check_text_prompts

        check_text_prompts(job, folder)
    return conv


@register_family("masked_lm")
class MaskedLMFamily(Family):
    modality = "text"
    rollout_config = TextRolloutConfig

    def add_lora(self, policy, lora) -> None:
        """peft on the transformers model, with per-architecture default targets (rlgen/models/lora.py)."""
        from rlgen.models.hf_lm import LoraOptions
        from rlgen.models.lora import add_lora

        add_lora(policy, LoraOptions(r=lora.rank, alpha=lora.alpha or lora.rank, dropout=lora.dropout,
                                     target_modules=list(lora.targets) or None))

    def enable_gradient_checkpointing(self, policy) -> None:
        """Non-reentrant recomputation (works under a frozen LoRA base); a clear error where the
        transformers model offers none."""
        from rlgen.models.hf_lm import enable_gradient_checkpointing

        enable_gradient_checkpointing(policy.lora_module())

    def saves_adapter(self, policy) -> bool:
        return getattr(policy, "lora_base", None) is not None  # adapter + a pointer to the base it loads onto

    def rollout(self, policy, items: list[dict], group_ids, cfg: TextRolloutConfig, generator, version: int = 0,
                step: int = 0):
        return rollout_text(policy, items, group_ids, cfg, generator, version)

    def prepare_pairs(self, policy, pairs) -> dict:
        """Token ids of every pair; answers EOS-padded to the pair's ``meta.gen_length`` (the builder
        writes it; else the task's width from ``meta.problem``; else one EOS past the longer answer).
        Pairs are ordered in buckets of one prompt length: no prompt padding (the base models were
        trained without it and their position embeddings would shift)."""
        from rlgen.data.pairs import PairFormatError
        from rlgen.data.text_tasks import get_task
        from rlgen.data.tokenizer import encode

        tok, eos = policy.tokenizer, policy.eos_id
        p_ids, w_ids, l_ids = [], [], []
        for r in pairs.rows:
            try:
                p, w, l = encode(tok, r.prompt), encode(tok, r.chosen), encode(tok, r.rejected)
            except ValueError as e:
                raise PairFormatError(f"{pairs.path}: row {r.row}: {e}", "untokenizable", r.row) from e
            width = r.meta.get("gen_length")
            if width is None and isinstance(r.meta.get("problem"), dict):
                width = get_task(r.meta["problem"]["task"]).gen_length(r.meta["problem"])
            width = max(int(width or max(len(w), len(l)) + 1), len(w), len(l))  # never truncate
            p_ids.append(p)
            w_ids.append(w + [eos] * (width - len(w)))
            l_ids.append(l + [eos] * (width - len(l)))
        lengths = sorted({len(p) for p in p_ids})
        return {"modality": "text", "prompt_ids": p_ids, "chosen_ids": w_ids, "rejected_ids": l_ids, "eos_id": eos,
                "bucket_ids": [lengths.index(len(p)) for p in p_ids]}
