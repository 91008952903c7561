"""Typed batches that cross actor boundaries: dataclasses of CPU tensors, never ad-hoc dicts.

One step's data goes driver → learner ranks as one of these, split by ``shard(n)`` into n parts
of the same *structure* (the same buckets, the same row counts), because every DeepSpeed rank
must run the same number of forward/backward passes (ZeRO reduces gradients inside backward).
Rows added only to even the shards out carry ``weight`` 0 and so contribute nothing.

Every batch carries ``global_size`` (real rows in the whole step, over all ranks) and ``seed``
(the step's seed, the same on every rank): algorithms normalise their loss by the global size and
draw per-row randomness from ``(seed, row id)``, so K ranks make exactly the update one rank makes.

- :class:`ImageRollout`: SDE trajectories of a flow policy (Flow-GRPO, image OPD).
- :class:`TextRollout`: decoded completions of a masked-diffusion LM, in padding-free buckets of
  one (prompt length, answer width) each (text GRPO, text OPD).
- :class:`ImagePairs` / :class:`TextPairs`: preference pairs of one step (Diffusion-DPO, VRPO).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import numpy as np
import torch


def _even_split(n_rows: int, n: int) -> list[torch.Tensor]:
    """Row indices of n contiguous parts padded to one length: a part short of rows repeats row 0
    of the whole (marked by ``pad`` below); returns (indices, pad mask) per part."""
    per = -(-n_rows // n)  # ceil
    out = []
    for i in range(n):
        idx = torch.arange(i * per, min((i + 1) * per, n_rows), dtype=torch.long)
        out.append(torch.cat([idx, torch.zeros(per - len(idx), dtype=torch.long)]))
    return out


def _pad_mask(n_rows: int, n: int) -> list[torch.Tensor]:
    per = -(-n_rows // n)
    return [torch.arange(i * per, (i + 1) * per) < n_rows for i in range(n)]


# ----------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------
@dataclass
class ImageRollout:
    """G samples per prompt from the SDE sampler, with everything needed to re-score any step.

    B samples, S denoising steps, latent shape (C, H, W) (pixels for rlgen's own models).
    """
    prompts: list[str]            # (B,) prompt of each sample (repeated G times per group)
    group_ids: torch.Tensor       # (B,) int64: samples of one prompt share an id
    latents: torch.Tensor         # (B, S+1, C, H, W): x at every grid σ, start noise first, sample last
    log_probs: torch.Tensor       # (B, S): behaviour-policy log-density of each step (0 on ODE steps)
    sigmas: torch.Tensor          # (S+1,) from 1 to 0
    sde_mask: torch.Tensor        # (S,) bool: which steps were stochastic (trainable)
    noise_level: float = 0.7
    cfg_scale: float = 1.0
    weights_version: int = 0      # version of the policy weights that sampled it (stale-weight check)
    images: torch.Tensor | None = None       # (B, 3, H', W') decoded samples in [-1, 1] (rewards, grids)
    rewards: torch.Tensor | None = None      # (B,) combined reward; NaN = no score
    advantages: torch.Tensor | None = None   # (B,)
    reward_components: dict[str, torch.Tensor] = field(default_factory=dict)  # name → (B,)
    global_size: int = 0          # samples in the whole step (all ranks); 0 = len(self)
    seed: int = 0                 # the step's seed (shared by every rank)
    sde_kind: str = "flow_grpo"   # the stochastic step that drew it (rlgen.samplers.flow_sde); re-scoring uses it

    def __post_init__(self):
        b, s1 = self.latents.shape[:2]
        if len(self.prompts) != b or self.group_ids.shape != (b,) or self.log_probs.shape != (b, s1 - 1):
            raise ValueError(f"inconsistent ImageRollout: {len(self.prompts)} prompts, group_ids "
                             f"{tuple(self.group_ids.shape)}, latents {tuple(self.latents.shape)}, "
                             f"log_probs {tuple(self.log_probs.shape)}")
        if self.sigmas.shape != (s1,) or self.sde_mask.shape != (s1 - 1,):
            raise ValueError(f"sigmas {tuple(self.sigmas.shape)} / sde_mask {tuple(self.sde_mask.shape)} do not "
                             f"match {s1 - 1} steps")

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def samples(self) -> torch.Tensor:
        return self.latents[:, -1]  # (B, C, H, W)

    @property
    def num_steps(self) -> int:
        return self.latents.shape[1] - 1

    def select(self, idx: torch.Tensor | list[int]) -> "ImageRollout":
        """Rows ``idx`` (shared per-step tensors are kept as they are)."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        pick = lambda t: None if t is None else t[idx]  # noqa: E731
        return replace(self, prompts=[self.prompts[i] for i in idx.tolist()], group_ids=self.group_ids[idx],
                       latents=self.latents[idx], log_probs=self.log_probs[idx], images=pick(self.images),
                       rewards=pick(self.rewards), advantages=pick(self.advantages),
                       reward_components={k: v[idx] for k, v in self.reward_components.items()})

    def reward_inputs(self) -> tuple[torch.Tensor, list[str]]:
        """The images and prompts the reward workers score for this rollout (a subclass may add
        images, e.g. G²RPO's ODE branch finals; ``keep_scores`` then takes their scores back)."""
        return self.images, list(self.prompts)

    def keep_scores(self, mixed):
        """The scores of ``reward_inputs()`` → the rows' own (B,) scores; extra ones stay on the rollout."""
        return mixed

    def for_learner(self) -> "ImageRollout":
        """Without the decoded images: learners train on latents, rewards were already scored."""
        return replace(self, images=None, global_size=self.global_size or len(self))

    def shard(self, n: int) -> list["ImageRollout"]:
        """Split into n contiguous, equal-size shards (for data-parallel learners)."""
        if len(self) % n:
            raise ValueError(f"batch of {len(self)} samples does not split into {n} equal shards")
        k = len(self) // n
        return [replace(self.select(list(range(i * k, (i + 1) * k))), global_size=self.global_size or len(self))
                for i in range(n)]

    @staticmethod
    def cat(parts: list["ImageRollout"]) -> "ImageRollout":
        first = parts[0]
        for p in parts[1:]:
            if not torch.equal(p.sigmas, first.sigmas) or not torch.equal(p.sde_mask, first.sde_mask):
                raise ValueError("cannot concatenate rollouts sampled on different σ grids")
            if p.sde_kind != first.sde_kind:
                raise ValueError(f"cannot concatenate rollouts of SDE kinds {first.sde_kind!r} and {p.sde_kind!r}")
        opt = lambda name: (None if getattr(first, name) is None  # noqa: E731
                            else torch.cat([getattr(p, name) for p in parts]))
        comps = {k: torch.cat([p.reward_components[k] for p in parts]) for k in first.reward_components}
        return replace(first, prompts=[x for p in parts for x in p.prompts],
                       group_ids=torch.cat([p.group_ids for p in parts]),
                       latents=torch.cat([p.latents for p in parts]),
                       log_probs=torch.cat([p.log_probs for p in parts]),
                       weights_version=min(p.weights_version for p in parts), images=opt("images"),
                       rewards=opt("rewards"), advantages=opt("advantages"), reward_components=comps)


# ----------------------------------------------------------------------------------------------
# Text
# ----------------------------------------------------------------------------------------------
class _RowBucket:
    """Rows of one shape: every tensor field's first dimension is the row; ``weight`` 0 marks a row
    that only evens out shards."""

    def __post_init__(self):
        if self.weight is None:
            self.weight = torch.ones(len(self.rows))

    def __len__(self) -> int:
        return len(self.rows)

    def select(self, idx: torch.Tensor):
        return replace(self, **{f.name: getattr(self, f.name)[idx] for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})


def shard_buckets(buckets: list, n: int) -> list[list]:
    """n lists holding every bucket, each bucket's rows split evenly; short parts are padded with
    weight-0 copies of the bucket's first row so every rank runs the same passes."""
    shards = [[] for _ in range(n)]
    for b in buckets:
        for i, (idx, real) in enumerate(zip(_even_split(len(b), n), _pad_mask(len(b), n))):
            part = b.select(idx)
            part.weight = part.weight * real.float()
            shards[i].append(part)
    return shards


@dataclass
class TextBucket(_RowBucket):
    """Rows with one prompt length P and answer width G: decoded as one padding-free batch."""

    tokens: torch.Tensor          # (b, P + G) long, prompt included
    order: torch.Tensor           # (b, G) long: decoding step of each answer token, −1 = eos fill
    token_logprobs: torch.Tensor  # (b, G) float: sampler's log p of each token at temperature 1
    rows: torch.Tensor            # (b,) long: the row's index in the TextRollout (rewards, advantages)
    prompt_length: int
    weight: torch.Tensor | None = None  # (b,) float: 1, or 0 for a row that only evens out shards


@dataclass
class TextRollout:
    """G completions per prompt; per-row fields are indexed by row (0..N-1), tokens live in buckets."""

    prompts: list[str]            # (N,) the text each row was conditioned on
    completions: list[str]        # (N,) decoded answers
    group_ids: torch.Tensor       # (N,) long
    buckets: list[TextBucket]
    meta: dict[str, list] = field(default_factory=dict)  # column → (N,) values: what rewards get as kwargs
    weights_version: int = 0
    rewards: torch.Tensor | None = None      # (N,)
    advantages: torch.Tensor | None = None   # (N,)
    reward_components: dict[str, torch.Tensor] = field(default_factory=dict)
    global_size: int = 0          # real rows (weight 1) in the whole step, all ranks
    seed: int = 0
    global_tokens: int = 0        # scored answer tokens (order >= 0) of real rows, all ranks (0 = not counted)

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def num_rows_in_buckets(self) -> int:
        return sum(len(b) for b in self.buckets)

    def scored_tokens(self) -> int:
        """Answer tokens the estimators score (``order >= 0``: eos fill excluded) of real rows: the
        normaliser of token-level loss aggregation, counted before sharding so every rank shares it."""
        return int(sum(float(((b.order >= 0).sum(1).float() * b.weight).sum()) for b in self.buckets))

    def keep_rows(self, keep: torch.Tensor) -> "TextRollout":
        """Drop rows with ``keep`` False from the buckets (per-row arrays stay indexed by row)."""
        buckets = []
        for b in self.buckets:
            sel = keep[b.rows].nonzero().squeeze(1)
            if len(sel):
                buckets.append(b.select(sel))
        return replace(self, buckets=buckets, global_size=int(sum(float(b.weight.sum()) for b in buckets)),
                       global_tokens=0)  # recounted at shard()

    def shard(self, n: int) -> list["TextRollout"]:
        """n shards with the same buckets, each bucket's rows split evenly; short parts are padded
        with weight-0 copies of the bucket's first row so every rank runs the same passes."""
        gs = self.global_size or int(sum(float(b.weight.sum()) for b in self.buckets))
        gt = self.global_tokens or self.scored_tokens()
        return [replace(self, buckets=bs, global_size=gs, global_tokens=gt) for bs in shard_buckets(self.buckets, n)]

    @staticmethod
    def cat(parts: list["TextRollout"]) -> "TextRollout":
        """Concatenate rollouts of disjoint prompts (e.g. the shards of several workers): row
        indices of later parts are offset; buckets of one (P, G) shape are merged."""
        prompts, completions, gids, buckets, meta, offset = [], [], [], {}, {}, 0
        for p in parts:
            prompts += p.prompts
            completions += p.completions
            gids.append(p.group_ids)
            for k, v in p.meta.items():
                meta.setdefault(k, []).extend(v)
            for b in p.buckets:
                key = (b.prompt_length, b.tokens.shape[1])
                shifted = TextBucket(b.tokens, b.order, b.token_logprobs, b.rows + offset, b.prompt_length, b.weight)
                buckets.setdefault(key, []).append(shifted)
            offset += len(p)
        merged = [TextBucket(torch.cat([b.tokens for b in bs]), torch.cat([b.order for b in bs]),
                             torch.cat([b.token_logprobs for b in bs]), torch.cat([b.rows for b in bs]),
                             bs[0].prompt_length, torch.cat([b.weight for b in bs]))
                  for _, bs in sorted(buckets.items())]
        return TextRollout(prompts, completions, torch.cat(gids), merged, meta,
                           weights_version=min(p.weights_version for p in parts))


# ----------------------------------------------------------------------------------------------
# Preference pairs (offline jobs)
# ----------------------------------------------------------------------------------------------
@dataclass
class ImagePairs:
    """One step's image pairs: winner and loser (b, C, H, W) in the policy's sample space."""

    prompts: list[str]
    chosen: torch.Tensor
    rejected: torch.Tensor
    rows: torch.Tensor            # (b,) long: position in the step (per-row randomness is keyed by it)
    weight: torch.Tensor | None = None
    global_size: int = 0
    seed: int = 0

    def __post_init__(self):
        if self.weight is None:
            self.weight = torch.ones(len(self.prompts))

    def __len__(self) -> int:
        return len(self.prompts)

    def select(self, idx: torch.Tensor) -> "ImagePairs":
        return ImagePairs([self.prompts[i] for i in idx.tolist()], self.chosen[idx], self.rejected[idx],
                          self.rows[idx], self.weight[idx], self.global_size, self.seed)

    def shard(self, n: int) -> list["ImagePairs"]:
        gs = self.global_size or len(self)
        out = []
        for idx, real in zip(_even_split(len(self), n), _pad_mask(len(self), n)):
            part = self.select(idx)
            part.weight, part.global_size = part.weight * real.float(), gs
            out.append(part)
        return out


@dataclass
class TextPairBucket(_RowBucket):
    prompt_ids: torch.Tensor      # (b, P)
    chosen_ids: torch.Tensor      # (b, L) EOS-padded answers
    rejected_ids: torch.Tensor    # (b, L)
    rows: torch.Tensor            # (b,) position in the step
    weight: torch.Tensor | None = None


@dataclass
class TextPairs:
    """One step's text pairs in buckets of one prompt length (no prompt padding)."""

    buckets: list[TextPairBucket]
    global_size: int = 0
    seed: int = 0

    def __len__(self) -> int:
        return sum(len(b) for b in self.buckets)

    def shard(self, n: int) -> list["TextPairs"]:
        return [TextPairs(bs, self.global_size or len(self), self.seed) for bs in shard_buckets(self.buckets, n)]


# ----------------------------------------------------------------------------------------------
def state_dict_to_numpy(state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Weights as numpy arrays: Ray's object store hands these to readers zero-copy."""
    return {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous().numpy()
            for k, v in state.items()}


def row_generator(seed: int, row: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator that is a pure function of (step seed, row): the same draws for a row on
    whichever rank it lands."""
    from rlgen.utils import derive_seed

    return torch.Generator(device=device).manual_seed(derive_seed(int(seed), int(row)))
