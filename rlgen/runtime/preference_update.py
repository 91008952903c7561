"""The learner side of offline preference training: pairs → micro-batches → loss → engine step.

Two modalities share one loop (rlgen/runtime/preference.py) through a small interface:

- :class:`ImagePairs` (Diffusion-DPO, rlgen/algos/diffusion_dpo.py) on a ``FlowPolicy``;
- :class:`TextPairs` (VRPO, rlgen/algos/vrpo.py) on a ``MaskedDiffusionLM``.

Each holds its pairs as tensors, names the module the engine wraps, and computes one micro-batch's
loss with the trained forward going through the engine (one forward per backward, as DeepSpeed
expects). The engine is DeepSpeed's (``DeepSpeedStrategy`` from the RL learner, one in-process
rank) or ``TorchEngine`` (same accumulation semantics, plain AdamW): see :func:`make_engine`.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
from torch import nn

from rlgen.runtime.flow_update import LearnerConfig, PolicyVelocity, TorchEngine, adapters_disabled, apply_lora

ENGINES = ("deepspeed", "torch")


def make_engine(module: nn.Module, cfg: LearnerConfig, gradient_accumulation_steps: int, kind: str):
    """(engine, strategy or None) training ``module``'s trainable parameters in this process.

    ``deepspeed``: the RL learner's ``DeepSpeedStrategy`` as a world of one rank (gloo on CPU);
    ``torch``: ``TorchEngine`` with AdamW. Both clip at ``cfg.grad_clip`` and step every
    ``gradient_accumulation_steps`` backwards.
    """
    if kind not in ENGINES:
        raise ValueError(f"train.engine must be one of {ENGINES}, got {kind!r}")
    if kind == "torch":
        params = [p for p in module.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.adam_eps,
                                weight_decay=cfg.weight_decay)
        return TorchEngine(module, opt, gradient_accumulation_steps, cfg.grad_clip), None
    from rlgen.runtime.actor_group import free_port
    from rlgen.runtime.learner import DeepSpeedStrategy

    strategy = DeepSpeedStrategy(cfg, gradient_accumulation_steps, rank=0, world_size=1)
    strategy.init_distributed("127.0.0.1", free_port())
    return strategy.prepare(module), strategy


def pad_answers(answers: list[list[int]], fill: int) -> torch.Tensor:
    """Right-pad token lists to one length with ``fill`` (the EOS the sampler fills answers with)."""
    L = max(len(a) for a in answers)
    return torch.tensor([a + [fill] * (L - len(a)) for a in answers])  # (B, L)


@dataclass
class ImagePairs:
    """Image pairs for Diffusion-DPO: ``chosen``/``rejected`` (N, C, H, W) in [-1, 1]."""

    prompts: list[str]
    chosen: torch.Tensor
    rejected: torch.Tensor
    algo: object  # DiffusionDPOConfig

    @classmethod
    def load(cls, pairs, policy, algo) -> "ImagePairs":
        w, l = pairs.images()
        return cls([r.prompt for r in pairs.rows], w, l, algo)

    def __len__(self) -> int:
        return len(self.prompts)

    def bucket_ids(self) -> list[int]:
        return [0] * len(self)  # every image pair batches with every other

    @staticmethod
    def wrap(policy: nn.Module) -> nn.Module:
        return PolicyVelocity(policy)

    def micro_loss(self, engine, policy, reference, idx: list[int], gen: torch.Generator):
        from rlgen.algos.diffusion_dpo import draw_noise, loss, pair_errors

        dev, k = policy.device, self.algo.noise_draws
        rep = [i for i in idx for _ in range(k)]  # k (ε, σ) draws per pair, in one forward
        prompts = [self.prompts[i] for i in rep]
        x_w, x_l = self.chosen[rep].to(dev), self.rejected[rep].to(dev)  # (b·k, C, H, W)
        noise, sigma = draw_noise(x_w, self.algo, gen)
        with torch.no_grad(), reference() as ref:
            r_w, r_l = pair_errors(ref.velocity_fn(prompts + prompts), x_w, x_l, noise, sigma)
        e_w, e_l = pair_errors(lambda x, s: engine(prompts + prompts, x, s, 1.0), x_w, x_l, noise, sigma)
        return loss(e_w, e_l, r_w, r_l, self.algo.beta)


@dataclass
class TextPairs:
    """Text pairs for VRPO, tokenized once: prompt ids and EOS-padded answer ids per pair."""

    prompt_ids: list[list[int]]
    chosen_ids: list[list[int]]
    rejected_ids: list[list[int]]
    mask_id: int
    eos_id: int
    algo: object  # VRPOConfig

    @classmethod
    def load(cls, pairs, policy, algo) -> "TextPairs":
        """Answers are padded with EOS to the pair's ``meta.gen_length`` (the builder writes it; else
        the task's width from ``meta.problem``; else one EOS past the longer answer)."""
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
        return cls(p_ids, w_ids, l_ids, policy.mask_id, eos, algo)

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def bucket_ids(self) -> list[int]:
        """Pairs batch only with pairs of the same prompt length (no prompt padding: the base
        models were trained without it and their position embeddings would shift)."""
        lengths = sorted({len(p) for p in self.prompt_ids})
        return [lengths.index(len(p)) for p in self.prompt_ids]

    @staticmethod
    def wrap(policy: nn.Module) -> nn.Module:
        return policy

    def micro_loss(self, engine, policy, reference, idx: list[int], gen: torch.Generator):
        from rlgen.algos.vrpo import dpo_loss, preference_elbos

        dev = policy.device
        prompt = torch.tensor([self.prompt_ids[i] for i in idx], device=dev)  # (b, P)
        both = pad_answers([self.chosen_ids[i] for i in idx] + [self.rejected_ids[i] for i in idx], self.eos_id)
        w, l = both.to(dev).chunk(2)  # (b, L) each
        with reference() as ref:
            e_w, e_l, r_w, r_l = preference_elbos(engine, ref, prompt, w, l, self.mask_id, self.algo, gen)
        return dpo_loss(e_w, e_l, r_w, r_l, self.algo.beta)


MODALITIES = {"image": ImagePairs, "text": TextPairs}


def reference_context(policy: nn.Module, cfg: LearnerConfig):
    """A function returning a context that yields the frozen reference model.

    Full fine-tuning: a frozen copy of the starting policy. LoRA (flow models only): the policy
    with its adapter disabled, so no second copy is held.
    """
    if cfg.lora_rank > 0:
        return lambda: adapters_disabled(policy)
    ref = copy.deepcopy(policy).requires_grad_(False).eval()
    return lambda: contextlib.nullcontext(ref)


def prepare_policy(policy: nn.Module, cfg: LearnerConfig, modality: str) -> nn.Module:
    if cfg.lora_rank > 0:
        if modality != "image":
            raise ValueError("learner.lora_rank > 0 is supported for flow image models only")
        apply_lora(policy, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
    return policy
