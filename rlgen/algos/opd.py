"""On-policy distillation (OPD): the student samples, the teacher grades every state it visits.

Agarwal et al. 2024 (GKD, arXiv:2306.13649) and Thinking Machines' "On-Policy Distillation" (2025):
train on the student's own trajectories (no exposure bias, unlike SFT on teacher samples) with a
dense per-step signal, the reverse KL KL(student ‖ teacher) at each visited state (mode-seeking,
unlike a reward's single number per sample). Pure torch; the learner picks states and models.

Images (flow models, sampled with Flow-GRPO's SDE, ``rlgen.samplers.flow.sde_step``): student and
teacher steps from the same state x_σ on the same σ grid are Gaussians with the same std, so

    KL(N(μ_s, s²I) ‖ N(μ_t, s²I)) = ‖μ_s − μ_t‖² / (2s²) = w(σ, σ') · ‖v_s − v_t‖²,
    w = c²·(σ − σ') / (2·std_σ²),  c = 1 + std_σ²·(1 − σ)/(2σ)     (:func:`velocity_kl_weight`)

(the means differ only through the velocity term ``v·c·dt``): a weighted velocity MSE on the
student's states. The teacher may be another checkpoint, or the same one run with stronger
classifier-free guidance (guidance distillation). Optionally mixed with Flow-GRPO's reward term.

Text (masked-diffusion LMs): at every state the student's decoding visited (its trajectory:
prompt + tokens unmasked before step s, the rest [MASK]), the exact per-position reverse KL
Σ_v p_s(v)·(log p_s(v) − log p_t(v)) over the vocabulary, for each still-masked answer position
(:func:`token_reverse_kl`). When the teacher only gives log-probs of the student's sampled tokens
(an autoregressive teacher served by vLLM, ``teacher_kind=vllm``; or a model with its own sampler
and no mask token, such as DiffusionGemma, which scores each answer canvas given the clean prefix,
``teacher_kind=sequence``), a score-function estimator of the whole answer's reverse KL
(:func:`sequence_kl_loss`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rlgen.algos.advantages import group_advantages
from rlgen.algos.base import Accumulator, AlgoConfig, Algorithm, LearnerContext, TeacherSpec, register_algorithm
from rlgen.algos.flow_grpo import (FlowGRPO, FlowGRPOConfig, kl_to_ref, kl_unit_scale, policy_loss, reduce_over_dims,
                                   step_loss)
from rlgen.algos.mdm_grpo import banned_ids, plan_logprobs, trajectory_plan
from rlgen.batches import TextRollout
from rlgen.config import FieldError, check_choice, check_range
from rlgen.samplers.flow_sde import sde_step_fn
from rlgen.samplers.masked import model_logits


# ----------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------
@dataclass
class FlowOPDConfig(FlowGRPOConfig):
    """Flow-GRPO's fields (used by the optional reward term and the sampler) plus the teacher."""

    name: str = "flow_opd"
    teacher: str = "rlgen/assets/flow_shapes_base"  # checkpoint or run folder of the teacher
    teacher_cfg_scale: float = 4.0   # CFG of the teacher's velocity (the student samples at rollout.cfg_scale)
    distill_weight: float = 1.0      # weight of KL(student step ‖ teacher step)
    reward_weight: float = 0.0       # weight of Flow-GRPO's clipped reward term (0 = pure distillation)
    kl_beta: float = 0.0             # KL to the reference: off by default (the teacher anchors the student)
    # direct: minimise the closed-form step KL to the teacher (its gradient) | ppo: Flow-GRPO's PPO-clip on
    # the step ratio with advantage −KL(student step ‖ teacher step), detached (Flow-OPD's default)
    mode: str = "direct"

    eval_teacher: bool = True        # score the teacher once at step 0 (the held-out gap the student should close)

    def __post_init__(self):
        super().__post_init__()
        check_choice(self, "mode", ("direct", "ppo"))
        if self.drop_zero_adv_groups:
            raise FieldError("drop_zero_adv_groups", "is a Flow-GRPO option; flow_opd trains every row on the teacher")
        check_range(self, "distill_weight", lo=0)
        check_range(self, "reward_weight", lo=0)
        check_range(self, "teacher_cfg_scale", lo=0)
        if self.distill_weight == 0 and self.reward_weight == 0:
            raise FieldError("distill_weight", "and reward_weight are both 0: nothing to train")
        if not self.teacher:
            raise FieldError("teacher", "is empty: name the teacher checkpoint")


def velocity_kl_weight(sigma: float, sigma_next: float, noise_level: float) -> float:
    """w with KL(student step ‖ teacher step) = w·‖v_s − v_t‖² for ``sde_step``'s SDE (docstring).

    std_σ² = a²·σ/(1 − σ_den) with σ_den = σ, or sigma_next on the σ = 1 step, as ``sde_step``.
    """
    s_den = sigma_next if sigma >= 1.0 else sigma
    std2 = noise_level ** 2 * sigma / (1.0 - s_den)  # std_σ²
    c = 1.0 + std2 * (1.0 - sigma) / (2.0 * sigma)
    return c * c * (sigma - sigma_next) / (2.0 * std2)


def image_step_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                    mean: torch.Tensor, teacher_mean: torch.Tensor, ref_mean: torch.Tensor | None,
                    std: torch.Tensor | float, num_dims: int, cfg: FlowOPDConfig,
                    kl_scale: float = 1.0) -> tuple[torch.Tensor, dict]:
    """One denoising step's OPD loss for a micro-batch.

    ``distill_weight·KL(student ‖ teacher)`` (closed form, reduced over dims like Flow-GRPO's KL,
    then averaged over the batch) ``+ reward_weight·(Flow-GRPO step loss)`` when reward_weight > 0.
    With ``mode="ppo"`` the distillation term is instead Flow-GRPO's PPO-clip on the step's ratio
    with advantage −KL (detached; clamped to ±adv_clip_max like rewards' advantages).
    mean, teacher_mean (b, C, H, W): the two steps' means from the same state; log-probs (b,).
    ``kl_scale`` (``kl_units``) scales the KL to the reference only.
    """
    kl = reduce_over_dims(kl_to_ref(mean, teacher_mean, std), num_dims, cfg.kl_reduction)  # (b,)
    metrics = {"distill_kl": kl.mean().item()}
    if cfg.mode == "ppo":
        lp = reduce_over_dims(log_prob, num_dims, cfg.log_prob_reduction)
        old = reduce_over_dims(old_log_prob, num_dims, cfg.log_prob_reduction)
        pg, pg_metrics = policy_loss(lp, old, -kl.detach(), cfg.clip_range, cfg.adv_clip_max)
        loss = cfg.distill_weight * pg
        metrics.update({f"distill_{k}": v for k, v in pg_metrics.items()})
    else:
        loss = cfg.distill_weight * kl.mean()
    if cfg.reward_weight > 0:
        rl_loss, rl_metrics = step_loss(log_prob, old_log_prob, advantages, mean, ref_mean, std, num_dims, cfg,
                                        kl_scale)
        loss = loss + cfg.reward_weight * rl_loss
        metrics.update(rl_metrics)
    elif cfg.kl_beta > 0:  # a pure-distillation run may still anchor to the reference
        ref_kl = reduce_over_dims(kl_to_ref(mean, ref_mean, std), num_dims, cfg.kl_reduction).mean() * kl_scale
        loss = loss + cfg.kl_beta * ref_kl
        metrics["kl"] = ref_kl.item()
    metrics["loss"] = loss.item()
    return loss, metrics


# ----------------------------------------------------------------------------------------------
# Text
# ----------------------------------------------------------------------------------------------
@dataclass
class MDMOPDConfig(AlgoConfig):
    """Masked-diffusion OPD: which states, which divergence, and an optional reward term."""

    name: str = "mdm_opd"
    teacher: str = "rlgen/assets/mdm_arith_teacher"  # masked-diffusion checkpoint, or an HF causal-LM folder
    # mdm: exact reverse KL at each visited state | vllm: an AR teacher's token log-probs (served by vLLM) |
    # sequence: a loaded teacher's per-token log-probs of the sampled answer (DiffusionGemma: canvas by canvas)
    teacher_kind: str = "mdm"
    states: str = "trajectory"       # trajectory: every decoding step's state | final: only the all-masked start
    distill_weight: float = 1.0
    reward_weight: float = 0.0       # weight of the GRPO term (group advantages × the trajectory log-prob)
    inner_iterations: int = 1        # gradient steps per rollout batch
    teacher_temperature: float = 1.0  # the teacher's logits are divided by this

    eval_teacher: bool = True        # score the teacher once at step 0 (masked-diffusion teachers)

    def __post_init__(self):
        check_choice(self, "teacher_kind", ("mdm", "vllm", "sequence"))
        check_choice(self, "states", ("trajectory", "final"))
        check_range(self, "inner_iterations", lo=1)
        check_range(self, "teacher_temperature", lo=0, lo_open=True)
        check_range(self, "distill_weight", lo=0)
        check_range(self, "reward_weight", lo=0)
        if self.distill_weight + self.reward_weight == 0:
            raise FieldError("distill_weight", "and reward_weight are both 0: nothing to train")
        if not self.teacher:
            raise FieldError("teacher", "is empty: name the teacher checkpoint")


def visited_states(tokens: torch.Tensor, order: torch.Tensor, prompt_length: int, mask_id: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The states a decoding trajectory passed through, and which positions were still masked.

    tokens (B, P+G), order (B, G) from ``generate`` (−1 = eos fill, not a model decision). Returns
    states (n, B, P+G): state s shows the answer tokens unmasked before step s, [MASK] elsewhere;
    masked (n, B, G) bool: positions masked in state s that the student later decided (order ≥ s).
    """
    n = max(int(order.max()) + 1, 1)
    steps = torch.arange(n, device=tokens.device)[:, None, None]  # (n, 1, 1)
    decided = order[None] >= 0  # (1, B, G)
    known = decided & (order[None] < steps)  # (n, B, G)
    states = tokens[None].repeat(n, 1, 1)  # (n, B, L)
    ans = states[:, :, prompt_length:]
    states[:, :, prompt_length:] = torch.where(known, ans, torch.full_like(ans, mask_id))
    return states, decided & ~known


def token_reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, banned_ids=()) -> torch.Tensor:
    """(…,) exact KL(p_s ‖ p_t) = Σ_v p_s(v)(log p_s(v) − log p_t(v)) over the last dim.

    ``banned_ids`` ([MASK], [PAD]: tokens the sampler never emits) are removed from both softmaxes.
    Gradients flow into the student only through ``student_logits``.
    """
    s, t = student_logits.float(), teacher_logits.float().detach()
    if len(banned_ids):
        # drop the banned columns (filling −inf would back-propagate 0·NaN through p_s·log p_s)
        banned = set(int(i) for i in banned_ids)
        keep = torch.tensor([i for i in range(s.shape[-1]) if i not in banned], device=s.device)
        s, t = s.index_select(-1, keep), t.index_select(-1, keep)
    log_ps, log_pt = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    return (log_ps.exp() * (log_ps - log_pt)).sum(-1)


def masked_mean_per_row(per_pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) mean of ``per_pos`` over each row's ``mask`` positions; per_pos, mask (n, B, G)."""
    m = mask.float()
    return (per_pos * m).sum(dim=(0, 2)) / m.sum(dim=(0, 2)).clamp_min(1.0)


def sequence_kl_loss(student_logp: torch.Tensor, teacher_logp: torch.Tensor, token_mask: torch.Tensor,
                     reduction: str = "mean") -> tuple[torch.Tensor, dict]:
    """Reverse-KL policy gradient from sampled answers only (the teacher gives log p_t of their tokens).

    student_logp (B, G) with grad: log p_s of each token at the state the student chose it in, so
    their sum is the log-probability of the sampled trajectory; teacher_logp (B, G): an
    autoregressive teacher's log p_t(y_k | prompt, y_<k), summing to log p_t(y); token_mask (B, G).
    For y ~ p_s, ∇KL(p_s‖p_t) = E[(log p_s(y) − log p_t(y))·∇log p_s(y)] (E[∇log p_s] = 0). The
    two factorise in different orders (decoding order vs left to right), so the per-sequence gap,
    not a per-position one, weights every token's score; a leave-one-out mean of the other rows'
    gaps is subtracted (a baseline independent of the row: unbiased, lower variance).
    ``reduction="none"`` returns the per-row terms (B,).
    """
    m = token_mask.to(student_logp.dtype)
    s_seq = (student_logp * m).sum(dim=1)  # (B,) log p_s(y)
    gap = s_seq.detach() - (teacher_logp * m).sum(dim=1)  # (B,) one-sample KL estimate per answer
    B = gap.shape[0]
    baseline = (gap.sum() - gap) / (B - 1) if B > 1 else torch.zeros_like(gap)
    rows = (gap - baseline) * s_seq
    return (rows if reduction == "none" else rows.mean()), {"distill_kl": float(gap.mean())}


# ----------------------------------------------------------------------------------------------
# The algorithms
# ----------------------------------------------------------------------------------------------
@register_algorithm("flow_opd")
class FlowOPD(FlowGRPO):
    """On-policy distillation of a flow policy: Flow-GRPO's loop, the step KL to a teacher as loss."""

    config = FlowOPDConfig
    min_group_size = 1

    def teacher(self) -> TeacherSpec:
        opts = {"cfg": self.cfg.teacher_cfg_scale} if self.cfg.eval_teacher else None
        return TeacherSpec(self.cfg.teacher, "policy", opts)

    def before_forward(self, ctx, mb, x, x_next, sigma, s, s_next) -> None:
        with torch.no_grad():  # the teacher's step from the same state, at its own guidance scale
            v_t = ctx.teacher.velocity_fn(mb.prompts, self.cfg.teacher_cfg_scale)(x.to(ctx.policy.dtype).contiguous(),
                                                                                   sigma)
            self._teacher_mean = sde_step_fn(mb.sde_kind)(x, v_t, s, s_next, mb.noise_level, prev_sample=x_next).mean

    def step_loss(self, ctx, mb, j, out, ref_mean, x):
        old_lp, adv = mb.log_probs[:, j].to(x.device), mb.advantages.to(x.device).float()
        kl_scale = kl_unit_scale(float(mb.sigmas[j]), float(mb.sigmas[j + 1]), self.cfg.kl_units)
        return image_step_loss(out.log_prob, old_lp, adv, out.mean, self._teacher_mean, ref_mean, out.std,
                               x[0].numel(), self.cfg, kl_scale)


@register_algorithm("mdm_opd")
class MDMOPD(Algorithm):
    """On-policy distillation of a masked-diffusion LM: exact reverse KL to a masked-diffusion
    teacher at every state the student visited, or a sequence-level estimator for an
    autoregressive teacher's token log-probs (served by vLLM); optionally plus a GRPO term."""

    family = "masked_lm"
    config = MDMOPDConfig
    rollout_fields = ("buckets",)
    min_group_size = 1

    def teacher(self) -> TeacherSpec:
        loaded = self.cfg.teacher_kind != "vllm"  # mdm and sequence teachers load like a policy
        return TeacherSpec(self.cfg.teacher, "policy" if loaded else "vllm",
                           {} if loaded and self.cfg.eval_teacher else None)

    def uses_reference(self, lora: bool) -> bool:
        return False

    def check_job(self, job) -> None:
        from rlgen.families.masked_lm import check_masked_lm_job

        check_masked_lm_job(job)

    def setup(self, ctx: LearnerContext) -> None:
        t, s = ctx.teacher, ctx.policy
        if self.cfg.teacher_kind == "vllm":
            t.check_vocab(len(s.tokenizer.get_vocab()))
        elif self.cfg.teacher_kind == "sequence":
            same = getattr(t, "tokenizer", None) is not None and t.tokenizer.get_vocab() == s.tokenizer.get_vocab()
            if not hasattr(t, "token_logprobs") or not same:
                raise ValueError(f"teacher {self.cfg.teacher}: algo.teacher_kind=sequence needs a model with "
                                 f"token_logprobs(prompt_ids, answer_ids) and the student's tokenizer")
        elif t.tokenizer.get_vocab() != s.tokenizer.get_vocab() or t.mask_id != s.mask_id:
            raise ValueError(f"teacher {self.cfg.teacher}: its tokenizer (or mask id) differs from the student's; "
                             f"on-policy distillation compares distributions over the same token ids")

    def advantages(self, batch: TextRollout) -> TextRollout:
        batch.advantages = group_advantages(batch.rewards, batch.group_ids)
        return batch

    @torch.no_grad()
    def _targets(self, ctx, b) -> dict:
        """What the update needs from one bucket, computed once per step."""
        a, dev, mask_id = self.cfg, ctx.device, ctx.policy.mask_id
        tokens, order, P = b.tokens.to(dev), b.order.to(dev), b.prompt_length
        out = {"tokens": tokens}
        if a.teacher_kind == "mdm":
            states, masked = visited_states(tokens, order, P, mask_id)  # (n, B, L), (n, B, G)
            if a.states == "final":
                states, masked = states[:1], masked[:1]
            n, B, L = states.shape
            t = model_logits(ctx.teacher, states.reshape(n * B, L))[:, P:].float() / a.teacher_temperature
            out.update(states=states, masked=masked, teacher=t.reshape(n, B, L - P, -1))
        elif a.teacher_kind == "vllm":
            out["teacher_lp"] = ctx.teacher.token_logprobs(b.tokens, P).to(dev)  # (B, G)
        else:  # e.g. DiffusionGemma: each canvas given the clean prefix, as its sampler's last step sees it
            out["teacher_lp"] = ctx.teacher.token_logprobs(tokens[:, :P], tokens[:, P:]).float()  # (B, G)
        if a.teacher_kind != "mdm" or a.reward_weight > 0:
            out["plan"] = trajectory_plan(None, tokens, order, P, mask_id)
        return out

    def _row_loss(self, ctx, batch, b, t: dict, lo: int, hi: int) -> tuple[torch.Tensor, dict]:
        a, P, banned = self.cfg, b.prompt_length, banned_ids(ctx.policy)
        rows = torch.zeros(hi - lo, device=ctx.device)
        m = {}
        if a.teacher_kind == "mdm":
            states, masked = t["states"][:, lo:hi], t["masked"][:, lo:hi]
            n, B, L = states.shape
            s = model_logits(ctx.engine, states.reshape(n * B, L))[:, P:]
            kl = token_reverse_kl(s.reshape(n, B, L - P, -1), t["teacher"][:, lo:hi], banned)  # (n, B, G)
            kl_rows = masked_mean_per_row(kl, masked)  # (B,)
            rows = rows + a.distill_weight * kl_rows
            m["distill_kl"] = float(kl_rows.mean().detach())
        lp = None
        if "plan" in t:
            plan = t["plan"]
            sub = type(plan)(plan.inputs[:, lo:hi], plan.view[lo:hi], P)
            lp = plan_logprobs(ctx.engine, sub, t["tokens"][lo:hi], banned)  # (B, G) at each decision state
        if a.teacher_kind != "mdm":
            seq, dm = sequence_kl_loss(lp, t["teacher_lp"][lo:hi], sub.token_mask, reduction="none")
            rows, m = rows + a.distill_weight * seq, {**m, **dm}
        if a.reward_weight > 0:  # REINFORCE with group advantages on the exact trajectory log-prob
            mask = sub.token_mask.float()
            seq_lp = (lp * mask).sum(1) / mask.sum(1).clamp_min(1.0)  # (B,)
            adv = batch.advantages[b.rows[lo:hi]].to(ctx.device).float()
            rows = rows - a.reward_weight * adv * seq_lp
        return rows, m

    def update(self, ctx: LearnerContext, batch: TextRollout) -> dict:
        targets = [self._targets(ctx, b) for b in batch.buckets]
        chunk = ctx.micro_batch_size or max(len(b) for b in batch.buckets)
        acc, norms = Accumulator(), []
        for _ in range(self.cfg.inner_iterations):
            for b, t in zip(batch.buckets, targets):
                for lo in range(0, len(b), chunk):
                    hi = min(lo + chunk, len(b))
                    rows, m = self._row_loss(ctx, batch, b, t, lo, hi)
                    w = b.weight[lo:hi].to(ctx.device)
                    ctx.engine.backward((rows * w).sum() / batch.global_size)
                    acc.add({"loss": float((rows * w).detach().sum() / w.sum().clamp_min(1.0)), **m}, float(w.sum()))
            gn = ctx.engine.step()
            if not math.isfinite(gn):  # stop before a NaN step wrecks the weights; checkpoints stay intact
                raise FloatingPointError(f"non-finite gradient norm ({gn}) in the distillation loss")
            norms.append(gn)
        return {**acc.mean(), "grad_norm": sum(norms) / len(norms)}
