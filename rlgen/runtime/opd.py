"""On-policy distillation jobs (rlgen.algos.opd): ``kind: flow_opd`` and ``kind: mdm_opd``.

    python train_rl.py --config configs/opd/flow_opd_shapes.yaml     # images: the shared Trainer
    python train_rl.py --config configs/opd/mdm_opd_arith.yaml       # text

Images run on the Flow-GRPO runtime unchanged (Ray rollout and reward workers, DeepSpeed
learners): the config's ``algo`` is a FlowOPDConfig, so every learner rank loads the frozen
teacher and trains on the KL between its own SDE steps and the teacher's from the same states.
Rewards are still scored each iteration: they are what the teacher–student gap is measured in.

Text runs in-process like masked-diffusion GRPO (``TextGRPOTrainer``: same rollouts, rewards,
evaluation, checkpoints and resume); only the update differs. Teachers: another masked-diffusion
checkpoint with the same tokenizer (exact reverse KL at every visited state), or an
autoregressive Hugging Face model served by vLLM whose vocabulary matches the student's (its
log-probs of the student's tokens, ``teacher_kind: vllm``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from rlgen.algos.advantages import group_advantages
from rlgen.algos.mdm_grpo import plan_logprobs, trajectory_plan
from rlgen.algos.opd import (FlowOPDConfig, MDMOPDConfig, masked_mean_per_row, sequence_kl_loss,
                             token_reverse_kl, visited_states)
from rlgen.config import RunConfig, register_config
from rlgen.runtime.job import FlowGRPOJobConfig
from rlgen.runtime.text_trainer import MDMGRPOJobConfig, TextGRPOTrainer
from rlgen.runtime.trainer import Trainer
from rlgen.samplers.masked import model_logits


@register_config("flow_opd")
@dataclass
class FlowOPDJobConfig(FlowGRPOJobConfig):
    kind: str = "flow_opd"
    run: RunConfig = field(default_factory=lambda: RunConfig(name="flow_opd"))
    algo: FlowOPDConfig = field(default_factory=FlowOPDConfig)
    eval_teacher: bool = True  # score the teacher once at step 0 (the held-out gap the student should close)


class FlowOPDTrainer(Trainer):
    """The Flow-GRPO ``Trainer`` (the learner sees ``algo.teacher``); adds the teacher's held-out score."""

    def _evaluate(self, it: int) -> dict:
        out = super()._evaluate(it)
        if it == 0 and out and self.cfg.eval_teacher:
            out["eval/teacher_accuracy"] = self._teacher_accuracy()
            self.eval_history[-1]["eval/teacher_accuracy"] = out["eval/teacher_accuracy"]
        return out

    @torch.no_grad()
    def _teacher_accuracy(self) -> float:
        """The teacher on the run's held-out prompts, sampled as the rollout workers sample evals."""
        from rlgen.models.flow import FlowPolicy
        from rlgen.runtime.rundir import resolve_checkpoint

        e, a = self.cfg.eval, self.cfg.algo
        teacher = FlowPolicy.from_pretrained(str(resolve_checkpoint(a.teacher))).eval()
        images = teacher.generate(self.evaluator.prompts, num_steps=e.num_steps, cfg_scale=a.teacher_cfg_scale,
                                  noise_level=0.0, shift=self.cfg.rollout.shift,
                                  generator=torch.Generator().manual_seed(e.seed), batch_size=64)
        return float(self.evaluator.score(images.float().cpu())["accuracy"])

    def fit(self) -> dict:
        result = super().fit()
        _report_gap(Path(result["report"]), result["eval_history"])
        return result


@register_config("mdm_opd")
@dataclass
class MDMOPDJobConfig(MDMGRPOJobConfig):
    kind: str = "mdm_opd"
    run: RunConfig = field(default_factory=lambda: RunConfig(name="mdm_opd", num_threads=1))
    algo: MDMOPDConfig = field(default_factory=MDMOPDConfig)


class MDMTeacher:
    """A masked-diffusion teacher: full next-token distributions at any masked state."""

    def __init__(self, path: str, student, device):
        from rlgen.models import load_model
        from rlgen.runtime.rundir import resolve_checkpoint

        self.model = load_model(resolve_checkpoint(path), device=str(device)).eval().requires_grad_(False)
        if self.model.tokenizer.get_vocab() != student.tokenizer.get_vocab() or self.model.mask_id != student.mask_id:
            raise ValueError(f"teacher {path}: its tokenizer (or mask id) differs from the student's; on-policy "
                             f"distillation compares distributions over the same token ids")

    @torch.no_grad()
    def logits(self, states: torch.Tensor) -> torch.Tensor:  # (N, L) → (N, L, V)
        return model_logits(self.model, states).float()


class VLLMTeacher:
    """An autoregressive teacher on vLLM: log p_t(y_k | prompt, y_<k) of given token ids."""

    def __init__(self, path: str, student):
        from rollouts.vllm_engine import VLLMEngine

        self.engine = VLLMEngine(path)
        v_teacher, v_student = len(self.engine.tokenizer), len(student.tokenizer.get_vocab())
        if v_teacher < v_student:
            raise ValueError(f"teacher {path}: vocabulary of {v_teacher} tokens cannot score the student's "
                             f"{v_student} token ids; the teacher must share the student's tokenizer")

    def token_logprobs(self, tokens: torch.Tensor, prompt_length: int) -> torch.Tensor:  # (B, P+G) → (B, G)
        ids = tokens.tolist()
        lps = self.engine.score([r[:prompt_length] for r in ids], [r[prompt_length:] for r in ids])
        return torch.tensor(lps, dtype=torch.float32)

    def close(self) -> None:
        self.engine.shutdown()


class TextOPDTrainer(TextGRPOTrainer):
    """``TextGRPOTrainer`` whose update is on-policy distillation toward ``algo.teacher``."""

    JOB_TITLE = "on-policy distillation (masked diffusion)"

    def __init__(self, cfg: MDMOPDJobConfig):
        super().__init__(cfg)
        a = cfg.algo
        self.teacher = (MDMTeacher(a.teacher, self.policy, self.device) if a.teacher_kind == "mdm"
                        else VLLMTeacher(a.teacher, self.policy))

    def _targets(self, b) -> dict:
        """What the update needs from one rollout bucket, computed once per iteration (no grad)."""
        a, dev = self.cfg.algo, self.device
        tokens, order = b.tokens.to(dev), b.order.to(dev)
        out = {"tokens": tokens}
        if a.teacher_kind == "mdm":
            states, masked = visited_states(tokens, order, b.prompt_length, self.policy.mask_id)  # (n, B, L), (n, B, G)
            if a.states == "final":
                states, masked = states[:1], masked[:1]
            n, B, L = states.shape
            t = self.teacher.logits(states.reshape(n * B, L))[:, b.prompt_length:] / a.teacher_temperature
            out.update(states=states, masked=masked, teacher=t.reshape(n, B, L - b.prompt_length, -1))
        else:
            out["teacher_lp"] = self.teacher.token_logprobs(b.tokens, b.prompt_length).to(dev)  # (B, G)
        if a.teacher_kind == "vllm" or a.reward_weight > 0:
            out["plan"] = trajectory_plan(None, tokens, order, b.prompt_length, self.policy.mask_id)
        if a.reward_weight > 0:
            out["adv"] = group_advantages(b.rewards, b.group_ids).to(dev).float()  # (B,)
        return out

    def _bucket_loss(self, b, t: dict) -> tuple[torch.Tensor, dict]:
        a = self.cfg.algo
        m = {}
        loss = torch.zeros((), device=self.device)
        if a.teacher_kind == "mdm":
            n, B, L = t["states"].shape
            s = model_logits(self.policy, t["states"].reshape(n * B, L))[:, b.prompt_length:]
            kl = token_reverse_kl(s.reshape(n, B, L - b.prompt_length, -1), t["teacher"], self.banned)  # (n, B, G)
            kl_rows = masked_mean_per_row(kl, t["masked"])  # (B,)
            loss = loss + a.distill_weight * kl_rows.mean()
            m["distill_kl"] = float(kl_rows.mean().detach())
        lp = None
        if "plan" in t:
            lp = plan_logprobs(self.policy, t["plan"], t["tokens"], self.banned)  # (B, G) at each decision state
        if a.teacher_kind == "vllm":
            dl, dm = sequence_kl_loss(lp, t["teacher_lp"], t["plan"].token_mask)
            loss, m = loss + a.distill_weight * dl, {**m, **dm}
        if a.reward_weight > 0:  # REINFORCE with group advantages on the exact trajectory log-prob
            mask = t["plan"].token_mask.float()
            seq_lp = (lp * mask).sum(1) / mask.sum(1).clamp_min(1.0)  # (B,)
            loss = loss - a.reward_weight * (t["adv"] * seq_lp).mean()
        return loss, m

    def _learn(self, batches, it: int) -> dict:
        """``inner_iterations`` gradient steps on the distillation loss of this iteration's rollouts."""
        a = self.cfg.algo
        targets = [self._targets(b) for b in batches]
        n_total = sum(len(b) for b in batches)
        sums: dict[str, float] = {}
        for _ in range(a.inner_iterations):
            self.opt.zero_grad(set_to_none=True)
            for b, t in zip(batches, targets):
                loss, m = self._bucket_loss(b, t)
                w = len(b) / n_total
                (loss * w).backward()
                for k, v in {"loss": loss.item(), **m}.items():
                    sums[k] = sums.get(k, 0.0) + v * w / a.inner_iterations
            gn = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.cfg.optim.grad_clip or 1e9)
            if not torch.isfinite(gn):  # stop before a NaN step wrecks the weights; checkpoints stay intact
                raise FloatingPointError(f"iteration {it}: non-finite gradient norm ({float(gn)}) in the distillation "
                                         f"loss; the last checkpoint under {self.run_dir} is unaffected")
            sums["grad_norm"] = sums.get("grad_norm", 0.0) + float(gn) / a.inner_iterations
            self.opt.step()
        return sums

    def evaluate(self, step: int, final: bool = False) -> dict:
        """The student's held-out row; at step 0 also the teacher's accuracy (the gap to close)."""
        row = super().evaluate(step, final)
        if step == 0 and isinstance(self.teacher, MDMTeacher):
            from rlgen.eval.text import benchmark_problems, score_problems

            problems = benchmark_problems(self.task.name, None, {"n_per_level": self.cfg.eval.n_per_level})
            res = score_problems(self.teacher.model, problems, {}, batch_size=256)
            row["eval/teacher_accuracy"] = res["accuracy"]
            if res["hard_accuracy"] is not None:
                row["eval/teacher_hard_accuracy"] = res["hard_accuracy"]
        return row

    def fit(self) -> dict:
        try:
            result = super().fit()
            _report_gap(Path(result["report"]), result["eval_history"])
            return result
        finally:
            if isinstance(self.teacher, VLLMTeacher):
                self.teacher.close()


def _report_gap(report: Path, history: list[dict]) -> None:
    """Append how much of the teacher–student gap the run closed (held-out accuracy) to report.md."""
    first = next((h for h in history if "eval/teacher_accuracy" in h), None)
    if first is None or len(history) < 2:
        return
    last = history[-1]
    lines = ["", "## Teacher–student gap (held-out)", "",
             "| metric | student start | student end | teacher | gap closed |", "|---|---|---|---|---|"]
    for key, tkey in (("eval/accuracy", "eval/teacher_accuracy"), ("eval/hard_accuracy", "eval/teacher_hard_accuracy")):
        if key in first and key in last and tkey in first:
            s0, s1, t = first[key], last[key], first[tkey]
            closed = f"{(s1 - s0) / (t - s0):.0%}" if abs(t - s0) > 1e-9 else "n/a"
            lines.append(f"| {key[5:]} | {s0:.3f} | {s1:.3f} (step {last['step']}) | {t:.3f} | {closed} |")
    with open(report, "a") as fh:
        fh.write("\n".join(lines) + "\n")
