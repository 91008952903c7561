"""Compositional shapes: synthetic captioned images and the grammar GenEval-style checks read.

Images are solid, non-overlapping coloured shapes on a plain grey background (default 32×32),
rendered without antialiasing from a seeded generator; every image is a correct picture of its
caption, and holds exactly the objects the caption names (no distractors).

Vocabulary: colours red green blue yellow purple orange (``COLORS``, pairwise ≥ 90 apart in
RGB); shapes circle square triangle (plurals add "s"); counts one..four; relations "to the
left of", "to the right of", "above", "below".  Background (128, 128, 128): ≥ 108 from every
palette colour and ≈ 0 in the [-1, 1] model space; grey rather than black or white because a
colour blurred into grey stays nearest that colour or grey (orange fading into black would
pass through red).

Surface forms and what passes.  The check depends only on the surface form, so any prompt file
in the grammar can be scored; the task type is only a label for per-task reporting.
  single    "a red circle"                    at least one red circle.
  pair      "a red circle and a blue square"  a red circle and a blue square (two distinct
                                              objects if the two specs are equal).
  count     "three green triangles", "one green triangle"
                                              exactly N green triangles; objects of other
                                              colours or shapes are ignored.
  position  "a red circle to the left of a blue square"
                                              both present, and some red circle A and blue
                                              square B satisfy GenEval's rule
                                              (``relation_holds``): the box-centre offset A − B,
                                              shrunk by 0.1·(size A + size B) per axis, points
                                              within 60° of the named direction (y grows down).
  Extra objects never fail a single, pair or position prompt.

Task types (``TASK_TYPES``, as in GenEval) → surface form:
  single_object, colors  single; colour and shape uniform.  Same form, same check: two labels
                         only so that reports keep GenEval's six columns.
  two_object             pair; two different shapes, colours independent.
  color_attr             pair; two different shapes and two different colours (binding).
  counting               count; N uniform in 1..4 ("one" takes the singular noun).
  position               position; the objects differ in shape or colour; training layouts
                         keep the direction within ~45° so no image is ambiguous.

Layout: a shape's box side is 25–37.5 % of the image side (8–12 px at 32×32; 8–10 px with three
or four objects), boxes keep image_size/16 px apart and stay inside the image.  Rendering pastes
cached boolean masks: a fraction of a millisecond per image, layout included.
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch

from rlgen.registry import register_dataset

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30), "green": (30, 180, 50), "blue": (40, 80, 235),
    "yellow": (240, 225, 40), "purple": (150, 50, 200), "orange": (255, 140, 10)}
BACKGROUND: tuple[int, int, int] = (128, 128, 128)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
PLURALS: dict[str, str] = {s: s + "s" for s in SHAPES}
COUNT_WORDS: dict[str, int] = {"one": 1, "two": 2, "three": 3, "four": 4}
RELATIONS: tuple[str, ...] = ("to the left of", "to the right of", "above", "below")
TASK_TYPES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
FORMS = ("single", "pair", "count", "position")
_TASK_FORM = {"single_object": "single", "colors": "single", "two_object": "pair",
              "color_attr": "pair", "counting": "count", "position": "position"}


class PromptError(ValueError):
    """A prompt outside the shapes grammar."""


@dataclass
class ObjectSpec:
    shape: str
    color: str
    count: int = 1


@dataclass
class ParsedPrompt:
    form: str  # "single" | "pair" | "count" | "position"
    objects: list[ObjectSpec]
    relation: str | None = None


@dataclass
class PlacedObject:
    shape: str
    color: str
    cx: float  # box centre, pixels from the left edge; the box's left column is cx − size/2
    cy: float  # box centre, pixels from the top edge
    size: int  # bounding-box side in pixels


@dataclass
class Scene:
    prompt: str
    task: str
    objects: list[PlacedObject] = field(default_factory=list)
    image_size: int = 32


# ----------------------------------------------------------------------------- grammar

_COLOR_RE = "|".join(COLORS)
_SHAPE_RE = "|".join(SHAPES)
_OBJ = rf"an? ({_COLOR_RE}) ({_SHAPE_RE})"
_PATTERNS = {
    "single": re.compile(rf"^{_OBJ}$"),
    "pair": re.compile(rf"^{_OBJ} and {_OBJ}$"),
    "count": re.compile(rf"^({'|'.join(COUNT_WORDS)}) ({_COLOR_RE}) ((?:{_SHAPE_RE})s?)$"),
    "position": re.compile(rf"^{_OBJ} ({'|'.join(RELATIONS)}) {_OBJ}$"),
}
_VOCAB = (set(COLORS) | set(SHAPES) | set(PLURALS.values()) | set(COUNT_WORDS)
          | {w for r in RELATIONS for w in r.split()} | {"a", "an", "and"})
_EXPECTED = ("expected one of 'a <colour> <shape>', 'a <colour> <shape> and a <colour> <shape>', "
             "'<count> <colour> <shape(s)>', 'a <colour> <shape> <relation> a <colour> <shape>' "
             f"with colours {sorted(COLORS)}, shapes {list(SHAPES)}, counts {list(COUNT_WORDS)}, "
             f"relations {list(RELATIONS)}")


def normalize_prompt(prompt: str) -> str:
    """Lower case, single spaces, no surrounding space or trailing full stop."""
    return " ".join(prompt.lower().split()).rstrip(".").strip()


def parse_prompt(prompt: str) -> ParsedPrompt:
    """Parse a caption of the shapes grammar; raise PromptError naming the problem otherwise."""
    if not isinstance(prompt, str):
        raise PromptError(f"shapes prompt must be a string, got {type(prompt).__name__}: {prompt!r}")
    text = normalize_prompt(prompt)
    if not text:
        raise PromptError(f"empty shapes prompt {prompt!r}; {_EXPECTED}")
    for form, pattern in _PATTERNS.items():
        m = pattern.match(text)
        if m is None:
            continue
        g = m.groups()
        if form == "single":
            return ParsedPrompt(form, [ObjectSpec(g[1], g[0])])
        if form == "pair":
            return ParsedPrompt(form, [ObjectSpec(g[1], g[0]), ObjectSpec(g[3], g[2])])
        if form == "position":
            return ParsedPrompt(form, [ObjectSpec(g[1], g[0]), ObjectSpec(g[4], g[3])], relation=g[2])
        n, noun = COUNT_WORDS[g[0]], g[2]
        shape = noun[:-1] if noun.endswith("s") else noun
        if (n == 1) != (noun == shape):  # "one squares" / "three square"
            want = shape if n == 1 else PLURALS[shape]
            raise PromptError(f"shapes prompt {prompt!r}: count '{g[0]}' needs the noun '{want}', got '{noun}'")
        return ParsedPrompt(form, [ObjectSpec(shape, g[1], n)])
    unknown = [w for w in text.split() if w not in _VOCAB]
    hint = f"unknown word(s) {unknown}; " if unknown else "words in the wrong order; "
    raise PromptError(f"shapes prompt {prompt!r} is outside the grammar: {hint}{_EXPECTED}")


def format_prompt(parsed: ParsedPrompt) -> str:
    """The canonical caption of a parsed prompt (inverse of ``parse_prompt``)."""
    objs = [f"{'an' if o.color[0] in 'aeiou' else 'a'} {o.color} {o.shape}" for o in parsed.objects]
    if parsed.form == "single":
        return objs[0]
    if parsed.form == "pair":
        return f"{objs[0]} and {objs[1]}"
    if parsed.form == "position":
        return f"{objs[0]} {parsed.relation} {objs[1]}"
    if parsed.form == "count":
        o, words = parsed.objects[0], {n: w for w, n in COUNT_WORDS.items()}
        return f"{words[o.count]} {o.color} {o.shape if o.count == 1 else PLURALS[o.shape]}"
    raise ValueError(f"format_prompt: unknown form {parsed.form!r}; expected one of {FORMS}")


def _check_task(task: str) -> str:
    if task not in _TASK_FORM:
        raise ValueError(f"unknown shapes task {task!r}; expected one of {TASK_TYPES}")
    return task


@lru_cache(maxsize=None)
def _all_specs(task: str) -> tuple[tuple, ...]:
    """Every (colours, shapes, count, relation) a task can draw, in a fixed order."""
    cs = list(itertools.product(COLORS, SHAPES))
    if task in ("single_object", "colors", "counting"):
        counts = COUNT_WORDS.values() if task == "counting" else (1,)
        return tuple(((c,), (s,), n, None) for n in counts for c, s in cs)
    keep = {"two_object": lambda c1, s1, c2, s2: s1 != s2,
            "color_attr": lambda c1, s1, c2, s2: s1 != s2 and c1 != c2,
            "position": lambda c1, s1, c2, s2: (c1, s1) != (c2, s2)}[task]
    relations = RELATIONS if task == "position" else (None,)
    return tuple(((c1, c2), (s1, s2), 1, r) for (c1, s1), (c2, s2) in itertools.product(cs, cs)
                 if keep(c1, s1, c2, s2) for r in relations)


def _spec_to_parsed(task: str, spec: tuple) -> ParsedPrompt:
    colors, shapes, count, relation = spec
    objects = [ObjectSpec(s, c, count) for c, s in zip(colors, shapes)]
    return ParsedPrompt(_TASK_FORM[task], objects, relation)


def all_prompts(task: str) -> list[str]:
    """Every distinct caption of one task type, in a fixed order."""
    return [format_prompt(_spec_to_parsed(task, s)) for s in _all_specs(_check_task(task))]


def _sample_parsed(rng: np.random.Generator, task: str | None) -> tuple[ParsedPrompt, str]:
    task = TASK_TYPES[rng.integers(len(TASK_TYPES))] if task is None else _check_task(task)
    specs = _all_specs(task)
    return _spec_to_parsed(task, specs[rng.integers(len(specs))]), task


def sample_prompt(rng: np.random.Generator, task: str | None = None) -> tuple[str, str]:
    """(prompt, task) drawn uniformly over the task's captions; task None = uniform over TASK_TYPES."""
    parsed, task = _sample_parsed(rng, task)
    return format_prompt(parsed), task


# ----------------------------------------------------------------------------- layout

_DIRECTIONS = {"to the left of": (0, -1.0), "to the right of": (0, 1.0), "above": (1, -1.0), "below": (1, 1.0)}


def relation_holds(a_center, a_dims, b_center, b_dims, relation: str, min_cos: float = 0.5):
    """Is object A `relation` object B?  GenEval's rule on (x, y) centres and (w, h) box sizes.

    The centre offset A − B is shrunk towards zero by 0.1·(dims A + dims B) per axis (touching
    or nearly aligned objects are in no relation), divided by the unshrunk offset's length, and
    the component along the named direction must exceed `min_cos` (0.5: within 60°).
    Arguments broadcast: (N, 2) arrays give an (N,) bool array, pairs give a bool.
    """
    if relation not in _DIRECTIONS:
        raise ValueError(f"relation_holds: unknown relation {relation!r}; expected one of {RELATIONS}")
    axis, sign = _DIRECTIONS[relation]
    off = np.subtract(a_center, b_center, dtype=np.float64)  # (..., 2) x, y
    slack = 0.1 * np.add(a_dims, b_dims, dtype=np.float64)  # (..., 2) or scalar
    shrunk = np.maximum(np.abs(off) - slack, 0.0) * np.sign(off)  # (..., 2)
    moved = np.abs(shrunk).max(axis=-1) >= 1e-3  # an all-zero shrunk offset is in no relation
    cos = sign * shrunk[..., axis] / np.maximum(np.hypot(off[..., 0], off[..., 1]), 1e-12)
    held = moved & (cos > min_cos)
    return bool(held) if held.ndim == 0 else held


def _layout_params(image_size: int, n_objects: int) -> tuple[int, int, int, int]:
    """(min size, max size, gap, border) in pixels for a scene of n_objects."""
    if image_size < 16:
        raise ValueError(f"shapes image_size must be ≥ 16 pixels, got {image_size}")
    hi_frac = 0.375 if n_objects <= 2 else 0.3125  # four 10 px shapes must fit at 32×32
    lo, hi = round(0.25 * image_size), round(hi_frac * image_size)
    return lo, hi, max(1, round(image_size / 16)), max(1, image_size // 32)


def _try_layout(rng: np.random.Generator, sizes: np.ndarray, image_size: int, gap: int,
                border: int, relation: str | None) -> np.ndarray | None:
    """Top-left corners (n, 2) for boxes of `sizes`, pairwise ≥ gap apart; None if stuck."""
    n_candidates = 64
    corners = np.zeros((len(sizes), 2), dtype=np.int64)
    for k, size in enumerate(sizes):
        cand = rng.integers(border, image_size - border - size + 1, size=(n_candidates, 2))  # (C, 2)
        ok = np.ones(n_candidates, dtype=bool)
        for j in range(k):
            lo_j, hi_j = corners[j], corners[j] + sizes[j]
            # separated iff the empty run between the boxes is ≥ gap along x or along y
            sep = np.maximum(lo_j - (cand + size), cand - hi_j)  # (C, 2)
            ok &= (sep >= gap).any(axis=1)
        if relation is not None and k == 1:
            # A (object 0) must stand in `relation` to B; a stricter angle than the check's 60°
            # keeps every training image unambiguous.
            ok &= relation_holds(corners[0] + sizes[0] / 2, sizes[0], cand + size / 2, size, relation, 0.7)
        hits = np.flatnonzero(ok)
        if len(hits) == 0:
            return None
        corners[k] = cand[hits[0]]
    return corners


def scene_for_prompt(rng: np.random.Generator, prompt: str | ParsedPrompt, image_size: int = 32,
                     task: str = "") -> Scene:
    """A random ground-truth scene showing exactly what `prompt` names."""
    parsed = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    kinds = [(o.shape, o.color) for o in parsed.objects for _ in range(o.count)]
    lo, hi, gap, border = _layout_params(image_size, len(kinds))
    for _ in range(100):
        sizes = rng.integers(lo, hi + 1, size=len(kinds))
        corners = _try_layout(rng, sizes, image_size, gap, border, parsed.relation)
        if corners is not None:
            break
    else:
        raise RuntimeError(f"scene_for_prompt: could not lay out {format_prompt(parsed)!r} "
                           f"in {image_size}×{image_size} after 100 tries")
    objects = [PlacedObject(shape, color, float(x + s / 2), float(y + s / 2), int(s))
               for (shape, color), (x, y), s in zip(kinds, corners, sizes)]
    return Scene(format_prompt(parsed), task, objects, image_size)


def sample_scene(rng: np.random.Generator, task: str | None = None, image_size: int = 32) -> Scene:
    """A random caption of `task` (None = uniform over TASK_TYPES) and a scene showing it."""
    parsed, task = _sample_parsed(rng, task)
    return scene_for_prompt(rng, parsed, image_size, task)


# ----------------------------------------------------------------------------- rendering

@lru_cache(maxsize=None)
def shape_mask(shape: str, size: int) -> np.ndarray:
    """(size, size) bool mask of a filled shape touching all four sides of its box."""
    c = (np.arange(size) + 0.5) - size / 2  # pixel-centre offsets from the box centre
    dx, dy = c[None, :], c[:, None]
    if shape == "square":
        mask = np.ones((size, size), dtype=bool)
    elif shape == "circle":
        mask = dx ** 2 + dy ** 2 <= (size / 2) ** 2
    elif shape == "triangle":  # apex up; row y spans half-width (y + 1) / 2, base = full width
        mask = np.abs(dx) <= (np.arange(size)[:, None] + 1) / 2
    else:
        raise ValueError(f"shape_mask: unknown shape {shape!r}; expected one of {SHAPES}")
    mask.flags.writeable = False  # shared through the cache
    return mask


def render(scene: Scene, image_size: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """(H, W, 3) uint8 picture of `scene` (at its own size unless told); fills `out` if given."""
    image_size = scene.image_size if image_size is None else image_size
    if scene.objects and scene.image_size != image_size:
        raise ValueError(f"render: scene was laid out for {scene.image_size}×{scene.image_size}, "
                         f"asked to render at {image_size}×{image_size}")
    img = np.empty((image_size, image_size, 3), dtype=np.uint8) if out is None else out
    img[:] = BACKGROUND
    for o in scene.objects:
        x0, y0 = round(o.cx - o.size / 2), round(o.cy - o.size / 2)
        img[y0:y0 + o.size, x0:x0 + o.size][shape_mask(o.shape, o.size)] = COLORS[o.color]
    return img


def to_model_space(images: np.ndarray) -> torch.Tensor:
    """uint8 (..., H, W, 3) → float (..., 3, H, W) in [-1, 1]."""
    t = torch.from_numpy(np.ascontiguousarray(images)).movedim(-1, -3)
    return t.float().div_(127.5).sub_(1.0)


def _check_tasks(tasks: list[str] | None) -> tuple[str, ...]:
    if tasks is None:
        return TASK_TYPES
    if not tasks:
        raise ValueError(f"shapes tasks must be a non-empty list drawn from {TASK_TYPES}, got {tasks!r}")
    return tuple(_check_task(t) for t in tasks)


def make_batch(rng: np.random.Generator, batch_size: int, image_size: int = 32,
               tasks: list[str] | None = None) -> tuple[torch.Tensor, list[str], list[str]]:
    """Fresh images (B, 3, H, W) in [-1, 1], prompts, tasks; tasks uniform over `tasks`."""
    pool = _check_tasks(tasks)
    images = np.empty((batch_size, image_size, image_size, 3), dtype=np.uint8)  # (B, H, W, 3)
    prompts, labels = [], []
    for b in range(batch_size):
        scene = sample_scene(rng, pool[rng.integers(len(pool))], image_size)
        render(scene, image_size, out=images[b])
        prompts.append(scene.prompt)
        labels.append(scene.task)
    return to_model_space(images), prompts, labels


@register_dataset("shapes")
class ShapesDataset(torch.utils.data.Dataset):
    """`size` captioned shape images; item i depends only on (seed, i), so any worker or epoch
    sees the same picture for the same index."""

    def __init__(self, size: int, seed: int = 0, image_size: int = 32, tasks: list[str] | None = None):
        if size < 0:
            raise ValueError(f"ShapesDataset size must be ≥ 0, got {size}")
        _layout_params(image_size, 1)  # validates image_size now, not at the first item
        self.size, self.seed, self.image_size = size, seed, image_size
        self.tasks = _check_tasks(tasks)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict:
        if not -self.size <= i < self.size:
            raise IndexError(f"ShapesDataset index {i} out of range for size {self.size}")
        i %= self.size
        rng = np.random.default_rng([self.seed, i])
        scene = sample_scene(rng, self.tasks[rng.integers(len(self.tasks))], self.image_size)
        image = to_model_space(render(scene, self.image_size))  # (3, H, W)
        return {"image": image, "prompt": scene.prompt, "task": scene.task}


def heldout_prompts(n_per_task: int = 32, seed: int = 12345) -> list[tuple[str, str]]:
    """A fixed evaluation list of (prompt, task), `n_per_task` for each of TASK_TYPES.

    Prompts within a task are distinct while the task has enough captions (single_object and
    colors have only 18: those cycle through all of them). The list is drawn from the same
    grammar as training; the single-object grammar is too small to hold captions out.
    """
    out = []
    for k, task in enumerate(TASK_TYPES):
        captions = all_prompts(task)
        rng = np.random.default_rng([seed, k])
        order = np.concatenate([rng.permutation(len(captions))
                                for _ in range(-(-n_per_task // len(captions)))])
        out.extend((captions[j], task) for j in order[:n_per_task])
    return out
