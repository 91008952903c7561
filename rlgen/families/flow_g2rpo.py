"""G²RPO's rollouts for the ``flow`` family: one SDE step per trajectory, plus ODE branches.

G²RPO (Zhou et al. 2025, "G²RPO: Granular GRPO for Precise Reward in Flow Models", arXiv:2510.01982):

- *Singular stochastic sampling*: the G samples of a prompt start from the same noise and follow
  the deterministic (ODE) sampler, except at one step k where each takes its own SDE step. Up to k
  the group shares one state, after it everything is deterministic, so the reward differences
  inside a group are caused by that one step's noise alone and its advantage is exact credit.
- *Multi-granularity branches*: from the state right after the SDE step, the rest of the
  trajectory is also integrated at coarser granularities (every g-th point of the remaining σ grid);
  every branch's final sample is rewarded, and the algorithm (rlgen/algos/g2rpo.py) integrates the
  per-granularity group advantages into the advantage of the SDE step.

Each row of a :class:`G2RPORollout` is the full-grid trajectory (granularity 1: ``latents``,
``images``, ``log_probs`` with one non-zero entry at ``sde_step``); the coarser branches' decoded
finals travel in ``branch_images`` and are scored by the same reward call as ``images``.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from rlgen.batches import ImageRollout
from rlgen.config import FieldError, check_choice
from rlgen.families.flow import ImageRolloutConfig
from rlgen.samplers.flow import sample


@dataclass
class G2RPORolloutConfig(ImageRolloutConfig):
    """``rollout:`` of a G²RPO job. Inherited fields as for Flow-GRPO; ``sde_window`` and
    ``sde_window_start`` here say where the single SDE step may fall: steps
    ``[max(sde_window_start, 0), … + sde_window)`` (sde_window 0: any step)."""

    granularities: list[int] = field(default_factory=lambda: [1, 2])  # strides over the remaining σ grid
    sde_step_choice: str = "stratified"  # stratified: group i takes window[i mod W] (every window step each
                                         # iteration, as the reference trains them all) | random: one draw per group
    shared_noise: bool = True            # a group's samples start from one noise (False: the singular step's
                                         # credit is no longer exact; for ablations)

    def __post_init__(self):
        super().__post_init__()
        check_choice(self, "sde_step_choice", ("stratified", "random"))
        if not self.granularities or any(int(g) != g or g < 1 for g in self.granularities):
            raise FieldError("granularities", f"must be a non-empty list of integers >= 1, got {self.granularities}")
        if len(set(self.granularities)) != len(self.granularities):
            raise FieldError("granularities", f"has repeated values: {self.granularities}")
        self.granularities = [int(g) for g in self.granularities]
        # options of plain Flow-GRPO rollouts that G²RPO's own sampler does not run: refuse, never ignore
        for key, default in (("sde_kind", "flow_grpo"), ("ode_solver", "euler"), ("post_window_steps", 0),
                             ("shared_group_noise", False)):
            if getattr(self, key) != default:
                raise FieldError(key, f"is not used by G²RPO's rollouts (its single SDE step is Flow-GRPO's; "
                                      f"shared_noise is its own switch): leave it at {default!r}")
        if self.sde_window_slide.every or self.teacache.threshold:
            raise FieldError("sde_window_slide" if self.sde_window_slide.every else "teacache",
                             "is not used by G²RPO's rollouts: leave it off")
        if not self.sde_window_steps():
            raise FieldError("sde_window_start", f"{self.sde_window_start} leaves no step of num_steps="
                                                 f"{self.num_steps} for the SDE step")

    def sde_window_steps(self) -> list[int]:
        """The steps the single SDE step is chosen from."""
        start = max(self.sde_window_start, 0)
        width = self.sde_window or self.num_steps - start
        return list(range(start, min(start + width, self.num_steps)))

    @property
    def branch_granularities(self) -> list[int]:
        """Granularities other than 1 (granularity 1 is the row's own trajectory)."""
        return [g for g in self.granularities if g != 1]

    def sample_rollout(self, policy, prompts, group_ids, generator, weights_version=0) -> "G2RPORollout":
        """What ``FlowFamily.rollout`` calls for a rollout config that brings its own sampler."""
        return rollout_g2rpo(policy, prompts, group_ids, self, generator, weights_version)


@dataclass
class G2RPORollout(ImageRollout):
    """An :class:`ImageRollout` whose rows each took one SDE step, with their ODE branches' finals.

    ``sde_mask`` (S,) marks the steps the SDE step may fall on (the same for every worker's part);
    the step row b actually took is ``sde_step[b]``, the only step with a log-prob.
    """

    sde_step: torch.Tensor | None = None          # (B,) long: the row's stochastic step k
    granularities: tuple[int, ...] = (1,)         # whose rewards the advantage integrates (1: the row's own final)
    branch_granularities: tuple[int, ...] = ()    # (M,) granularities of the branches (each > 1)
    branch_images: torch.Tensor | None = None     # (B, M, 3, H', W') decoded branch finals, [-1, 1]
    branch_rewards: torch.Tensor | None = None    # (B, M) their combined rewards (NaN = no score)

    def select(self, idx) -> "G2RPORollout":
        idx = torch.as_tensor(idx, dtype=torch.long)
        pick = lambda t: None if t is None else t[idx]  # noqa: E731
        return replace(super().select(idx), sde_step=pick(self.sde_step), branch_images=pick(self.branch_images),
                       branch_rewards=pick(self.branch_rewards))

    def for_learner(self) -> "G2RPORollout":
        return replace(super().for_learner(), branch_images=None)

    @staticmethod
    def cat(parts: list["G2RPORollout"]) -> "G2RPORollout":
        opt = lambda name: (None if getattr(parts[0], name) is None  # noqa: E731
                            else torch.cat([getattr(p, name) for p in parts]))
        return replace(ImageRollout.cat(parts), sde_step=opt("sde_step"), branch_images=opt("branch_images"),
                       branch_rewards=opt("branch_rewards"))

    # -- the reward hooks Workers calls: the branch finals are scored in the same call ---------------
    def reward_inputs(self) -> tuple[torch.Tensor, list[str]]:
        """(B·(1+M), 3, H', W') images and their prompts: the rows' finals, then row by row the branches."""
        if self.branch_images is None or self.branch_images.shape[1] == 0:
            return self.images, list(self.prompts)
        m = self.branch_images.shape[1]
        images = torch.cat([self.images, self.branch_images.flatten(0, 1)])
        return images, list(self.prompts) + [p for p in self.prompts for _ in range(m)]

    def keep_scores(self, mixed):
        """Keep the branch scores (B, M) here; return the rows' own scores (a MixedRewards of B)."""
        b = len(self)
        if len(mixed.total) == b:
            return mixed
        self.branch_rewards = mixed.total[b:].reshape(b, -1).float()
        return replace(mixed, total=mixed.total[:b], valid=mixed.valid[:b],
                       components={k: v[:b] for k, v in mixed.components.items()})


def branch_grid(sigmas: torch.Tensor, start: int, granularity: int) -> torch.Tensor:
    """σ grid of a branch from ``sigmas[start]`` to the end, visiting every ``granularity``-th point.

    The last point (σ = 0) is always kept, so a branch with n remaining steps takes ceil(n/g) steps
    (the final one may be shorter). Returns (n_g + 1,) float32.
    """
    last = len(sigmas) - 1
    idx = list(range(start, last + 1, granularity))
    if idx[-1] != last:
        idx.append(last)
    return sigmas[idx]


def choose_sde_steps(group_ids: torch.Tensor, window: list[int], choice: str, generator: torch.Generator
                     ) -> torch.Tensor:
    """(B,) long: each group's single SDE step, the same for all rows of a group."""
    uniq, inv = torch.unique(group_ids, return_inverse=True)  # (G,), (B,)
    w = torch.tensor(window, dtype=torch.long)
    if choice == "stratified":  # the step's global group id spreads the groups over the window on every worker
        per_group = w[uniq.long() % len(w)]
    else:
        per_group = w[torch.randint(len(w), (len(uniq),), generator=generator)]
    return per_group[inv]


def group_noise(group_ids: torch.Tensor, shape, shared: bool, generator: torch.Generator) -> torch.Tensor:
    """(B, *shape) start noise; with ``shared`` one draw per group, repeated over its rows."""
    if not shared:
        return torch.randn((len(group_ids), *shape), generator=generator)
    uniq, inv = torch.unique(group_ids, return_inverse=True)
    return torch.randn((len(uniq), *shape), generator=generator)[inv]


@torch.no_grad()
def rollout_g2rpo(policy, prompts: list[str], group_ids: torch.Tensor, cfg: G2RPORolloutConfig,
                  generator: torch.Generator, weights_version: int = 0) -> G2RPORollout:
    """One singular-SDE trajectory per entry of ``prompts`` (G per group) and its ODE branch finals."""
    dev = policy.device
    sigmas = policy.sigmas(cfg.num_steps, cfg.shift or None).float()  # (S+1,)
    window = cfg.sde_window_steps()
    group_ids = group_ids.cpu()
    ks = choose_sde_steps(group_ids, window, cfg.sde_step_choice, generator)  # (B,)
    noise = group_noise(group_ids, policy.sample_shape, cfg.shared_noise, generator)  # (B, C, H, W)
    dev_gen = generator if dev.type == "cpu" else torch.Generator(dev).manual_seed(
        int(torch.randint(2**62, (1,), generator=generator)))
    grans = cfg.branch_granularities
    b, s = len(prompts), cfg.num_steps
    latents = torch.empty((b, s + 1, *policy.sample_shape))
    log_probs = torch.zeros(b, s)
    images, branch_images = None, None
    # rows sharing k share the grid of every stage: sample them together, batch_size rows at a time
    for k in sorted(set(ks.tolist())):
        rows = torch.nonzero(ks == k).flatten()
        for lo in range(0, len(rows), cfg.batch_size):
            r = rows[lo:lo + cfg.batch_size]
            chunk = [prompts[i] for i in r.tolist()]
            v_fn = policy.velocity_fn(chunk, cfg.cfg_scale)
            traj = sample(v_fn, noise[r].to(dev), sigmas.to(dev), noise_level=cfg.noise_level, generator=dev_gen,
                          sde_steps=[k])  # ODE everywhere but step k
            latents[r] = traj.latents.float().cpu()
            log_probs[r] = traj.log_probs.float().cpu()
            img = policy.decode(traj.samples).float().cpu()
            if images is None:
                images = torch.empty((b, *img.shape[1:]))
                branch_images = torch.empty((b, len(grans), *img.shape[1:]))
            images[r] = img
            x_after = traj.latents[:, k + 1]  # (r, C, H, W): the state right after the SDE step
            for m, g in enumerate(grans):
                if k + 1 == s:  # the SDE step was the last one: nothing left to integrate
                    branch_images[r, m] = img
                    continue
                branch = sample(v_fn, x_after, branch_grid(sigmas, k + 1, g).to(dev), noise_level=0.0,
                                keep_latents=False)
                branch_images[r, m] = policy.decode(branch.samples).float().cpu()
    sde_mask = torch.zeros(s, dtype=torch.bool)
    sde_mask[window] = True
    return G2RPORollout(prompts=list(prompts), group_ids=group_ids, latents=latents, log_probs=log_probs,
                        sigmas=sigmas.cpu(), sde_mask=sde_mask, noise_level=cfg.noise_level, cfg_scale=cfg.cfg_scale,
                        weights_version=weights_version, images=images, sde_step=ks,
                        granularities=tuple(cfg.granularities), branch_granularities=tuple(grans), branch_images=branch_images)
