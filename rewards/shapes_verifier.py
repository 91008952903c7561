"""GenEval-like verifier for the compositional-shapes grammar (``rlgen.data.shapes``).

From pixels to objects (``detect_objects``):
  1. every pixel takes the nearest of the background and the six palette colours (RGB
     distance); a pixel farther than ``MAX_COLOR_DIST`` from all of them (an off-palette or
     muddy colour) counts as background;
  2. 8-connected components of each colour; components smaller than 14 px per 32×32 image
     area (scaled with H·W) are noise and dropped; nothing is merged;
  3. shape from the component's bounding box: apex-up taper (mean row width of the top third /
     bottom third < 0.65) → triangle; otherwise the filled fraction of the four corner cells
     (each a quarter of the box side) tells a square (≥ 0.5) from a circle.
  Centres are bounding-box centres, as in GenEval.

What passes is defined per surface form in ``rlgen.data.shapes``; the task type never enters.
Partial score = fraction of sub-checks satisfied, all equally weighted:
  single   "a C S"               [some C object, some S object, some C S object]
  pair     "a C1 S1 and a C2 S2" the three single sub-checks for each object (6); when
                                 C1 S1 = C2 S2 the third needs two such objects
  count    "N C S(s)"            [some C object, some S object, some C S object,
                                  exactly N C S objects]
  position "a C1 S1 REL a C2 S2" the six pair sub-checks + [REL holds for some pair]
passed ⇔ every sub-check holds ⇔ score = 1.0.

Strict mode (``strict=True``; rewards ``shapes_pass_strict`` / ``shapes_verifier_strict``, and the
benchmark's ``accuracy_strict``) adds one sub-check to every form: the image holds exactly as many
objects as the prompt names (1 for single, 2 for pair and position, N for count), so a second copy
of "a red circle" or a distractor fails. The lenient check lets a policy pass single-object
prompts by drawing two copies; the training images never hold extra objects.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import product

import numpy as np
import torch
from scipy import ndimage

from rlgen.data.shapes import BACKGROUND, COLORS, ParsedPrompt, parse_prompt, relation_holds
from rlgen.registry import register_reward

_NAMES = ["background", *COLORS]
_PALETTE = np.array([BACKGROUND, *COLORS.values()], dtype=np.float32)  # (7, 3)
_PALETTE_SQ = (_PALETTE ** 2).sum(1)  # (7,)
# Off-palette colours (black, white, cyan, muddy mixes) are not objects; the cap is ~0.8 of the
# closest pair's distance (yellow–orange, ~91) so that noise (std 0.05 ≈ 11 in RGB norm) and the
# colour drift of generated samples still count.
MAX_COLOR_DIST = 75.0
MIN_AREA_32 = 14  # px at 32×32
TAPER_TRIANGLE = 0.65
CORNER_SQUARE = 0.5
_EIGHT = np.ones((3, 3), dtype=bool)


@dataclass
class Detection:
    color: str
    shape: str
    cx: float  # bounding-box centre, pixels from the left
    cy: float  # bounding-box centre, pixels from the top
    area: int  # pixels
    bbox: tuple[int, int, int, int]  # (x0, y0, x1, y1), x1/y1 exclusive


@dataclass
class Verdict:
    passed: bool
    score: float  # fraction of sub-checks satisfied, in [0, 1]
    form: str
    details: str  # "sub-check=ok|FAIL; ..." then the detections


def to_uint8_image(image) -> np.ndarray:
    """uint8 (H, W, 3) numpy, or float (3, H, W) tensor/array in [-1, 1] → uint8 (H, W, 3)."""
    if isinstance(image, torch.Tensor):
        image = image.detach().to("cpu")
        image = image.numpy() if image.dtype == torch.uint8 else image.float().numpy()
    image = np.asarray(image)
    if image.ndim == 3 and image.dtype == np.uint8 and image.shape[-1] == 3:
        return image
    if image.ndim == 3 and np.issubdtype(image.dtype, np.floating) and image.shape[0] == 3:
        return np.rint((np.clip(image, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8).transpose(1, 2, 0)
    raise ValueError(f"shapes verifier: expected a uint8 (H, W, 3) image or a float (3, H, W) image "
                     f"in [-1, 1], got dtype {image.dtype} shape {tuple(image.shape)}")


def _classify(mask: np.ndarray) -> str:
    """Shape of one component cropped to its bounding box, (h, w) bool."""
    h, w = mask.shape
    rows = mask.sum(axis=1).astype(np.float64)  # (h,) width of each row
    third = max(1, h // 3)
    taper = rows[:third].mean() / max(rows[-third:].mean(), 1e-6)
    if taper < TAPER_TRIANGLE:
        return "triangle"
    ch, cw = max(1, round(h / 4)), max(1, round(w / 4))
    corners = np.concatenate([mask[:ch, :cw].ravel(), mask[:ch, -cw:].ravel(),
                              mask[-ch:, :cw].ravel(), mask[-ch:, -cw:].ravel()])
    return "square" if corners.mean() >= CORNER_SQUARE else "circle"


def detect_objects(image) -> list[Detection]:
    """Objects in one image, in colour order then raster order of their first pixel."""
    img = to_uint8_image(image)
    h, w, _ = img.shape
    pix = img.reshape(-1, 3).astype(np.float32)  # (H·W, 3)
    # ‖x − p‖² − ‖x‖² as one small matmul: ten times cheaper than broadcasting (H, W, 7, 3)
    d2 = _PALETTE_SQ - 2.0 * pix @ _PALETTE.T  # (H·W, 7)
    label = d2.argmin(1)  # (H·W,) 0 = background
    far = d2[np.arange(len(pix)), label] + (pix ** 2).sum(1) > MAX_COLOR_DIST ** 2
    label[far] = 0
    label = label.reshape(h, w)
    min_area = max(2, round(MIN_AREA_32 * h * w / (32 * 32)))
    found = []
    for k in np.flatnonzero(np.bincount(label.ravel(), minlength=len(_NAMES))[1:] >= min_area) + 1:
        comps, n = ndimage.label(label == k, structure=_EIGHT)
        areas = np.bincount(comps.ravel(), minlength=n + 1)
        for j, sl in enumerate(ndimage.find_objects(comps), start=1):
            if areas[j] < min_area:
                continue
            ys, xs = sl
            bbox = (xs.start, ys.start, xs.stop, ys.stop)
            found.append(Detection(_NAMES[k], _classify(comps[sl] == j), (xs.start + xs.stop) / 2,
                                   (ys.start + ys.stop) / 2, int(areas[j]), bbox))
    return found


def _dims(d: Detection) -> tuple[int, int]:
    return d.bbox[2] - d.bbox[0], d.bbox[3] - d.bbox[1]


def sub_checks(parsed: ParsedPrompt, dets: list[Detection], strict: bool = False) -> list[tuple[str, bool]]:
    """(name, satisfied) for every sub-check of the prompt's surface form (see module doc)."""
    checks = []
    wanted: dict[tuple[str, str], int] = {}
    for o in parsed.objects:  # a pair naming one object twice needs two of it
        wanted[(o.color, o.shape)] = wanted.get((o.color, o.shape), 0) + 1
    for o in parsed.objects:
        matching = sum(d.color == o.color and d.shape == o.shape for d in dets)
        checks += [(f"some {o.color}", any(d.color == o.color for d in dets)),
                   (f"some {o.shape}", any(d.shape == o.shape for d in dets)),
                   (f"{o.color} {o.shape} present", matching >= wanted[(o.color, o.shape)])]
        if parsed.form == "count":
            checks.append((f"exactly {o.count} {o.color} {o.shape} (saw {matching})", matching == o.count))
    if parsed.form == "position":
        a, b = parsed.objects
        holds = any(relation_holds((da.cx, da.cy), _dims(da), (db.cx, db.cy), _dims(db), parsed.relation)
                    for da, db in product(dets, dets)
                    if da is not db and (da.color, da.shape) == (a.color, a.shape)
                    and (db.color, db.shape) == (b.color, b.shape))
        checks.append((f"{a.color} {a.shape} {parsed.relation} {b.color} {b.shape}", holds))
    if strict:
        named = sum(o.count for o in parsed.objects)  # single 1, pair/position 2, count N
        checks.append((f"exactly {named} object(s) in all (saw {len(dets)})", len(dets) == named))
    return checks


def verify(image, prompt: str, strict: bool = False, dets: list[Detection] | None = None) -> Verdict:
    """Pass/fail and partial score of one image against one prompt of the shapes grammar.
    ``dets`` (``detect_objects(image)``) lets a caller check one image both ways for one detection."""
    parsed = parse_prompt(prompt)
    dets = detect_objects(image) if dets is None else dets
    checks = sub_checks(parsed, dets, strict)
    n_ok = sum(ok for _, ok in checks)
    seen = ", ".join(f"{d.color} {d.shape}@({d.cx:.0f},{d.cy:.0f})" for d in dets) or "nothing"
    details = "; ".join(f"{name}={'ok' if ok else 'FAIL'}" for name, ok in checks) + f" | saw: {seen}"
    return Verdict(n_ok == len(checks), n_ok / len(checks), parsed.form, details)


def _verdicts(samples, prompts, strict: bool = False) -> list[Verdict]:
    if isinstance(prompts, str):
        raise ValueError("shapes verifier: prompts must be a list of strings, got a single string")
    n = samples.shape[0] if isinstance(samples, (torch.Tensor, np.ndarray)) and samples.ndim == 4 else len(samples)
    if n != len(prompts):
        raise ValueError(f"shapes verifier: {n} samples but {len(prompts)} prompts; they must pair up")
    return [verify(samples[i], p, strict) for i, p in enumerate(prompts)]


@register_reward("shapes_verifier")
def shapes_verifier(samples, prompts, **meta) -> list[float]:
    """Partial score in [0, 1] per sample (1.0 iff it passes). samples: (B, 3, H, W) float in
    [-1, 1], or a list of uint8 (H, W, 3) arrays."""
    return [v.score for v in _verdicts(samples, prompts)]


@register_reward("shapes_pass")
def shapes_pass(samples, prompts, **meta) -> list[float]:
    """1.0 if the sample passes its prompt's check, else 0.0."""
    return [float(v.passed) for v in _verdicts(samples, prompts)]


@register_reward("shapes_verifier_strict")
def shapes_verifier_strict(samples, prompts, **meta) -> list[float]:
    """``shapes_verifier`` plus the strict sub-check: exactly the named number of objects."""
    return [v.score for v in _verdicts(samples, prompts, strict=True)]


@register_reward("shapes_pass_strict")
def shapes_pass_strict(samples, prompts, **meta) -> list[float]:
    """1.0 if the sample passes its prompt's strict check (no extra objects), else 0.0."""
    return [float(v.passed) for v in _verdicts(samples, prompts, strict=True)]
