"""Shapes verifier: accuracy on ground truth, rejection of wrong prompts, robustness, rewards."""
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from scipy import ndimage

from rewards import shapes_verifier as V
from rlgen.data import shapes as S
from rlgen.data.shapes import PromptError, parse_prompt
from rlgen.registry import REWARDS


def _accuracy(image_size: int, n: int, seed: int, degrade=None) -> dict[str, float]:
    """Per-task pass rate of rendered ground truth against its own caption."""
    rng = np.random.default_rng(seed)
    acc = {}
    for task in S.TASK_TYPES:
        passed = 0
        for _ in range(n):
            scene = S.sample_scene(rng, task, image_size)
            image = S.render(scene)
            passed += V.verify(image if degrade is None else degrade(image, rng), scene.prompt).passed
        acc[task] = passed / n
    return acc


@pytest.mark.parametrize("image_size, n", [(32, 300), (64, 150)])
def test_ground_truth_passes(image_size, n):
    acc = _accuracy(image_size, n, seed=10 + image_size)
    print(f"ground truth {image_size}x{image_size}: {acc}")
    assert min(acc.values()) >= 0.99, f"per-task accuracy at {image_size}: {acc}"


def _noisy_blurred(image: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
    """Mild Gaussian blur (σ = 0.6 px per 32 px) then noise of std 0.05 in [-1, 1] units."""
    x = S.to_model_space(image).numpy()  # (3, H, W)
    sigma = 0.6 * image.shape[0] / 32
    x = ndimage.gaussian_filter(x, sigma=(0, sigma, sigma)) + rng.normal(0, 0.05, x.shape)
    return torch.from_numpy(np.clip(x, -1, 1)).float()


@pytest.mark.parametrize("image_size", [32, 64])
def test_noisy_blurred_ground_truth_passes(image_size):
    n = 150 if image_size == 32 else 60
    acc = _accuracy(image_size, n, seed=20 + image_size, degrade=_noisy_blurred)
    print(f"noisy+blurred {image_size}x{image_size}: {acc}")
    assert min(acc.values()) >= 0.95, f"per-task accuracy, noisy and blurred, at {image_size}: {acc}"


def _mismatch(parsed, rng: np.random.Generator) -> tuple[str, str]:
    """(kind, prompt) of the same form that the scene for `parsed` does not show."""
    p = S.ParsedPrompt(parsed.form, [S.ObjectSpec(o.shape, o.color, o.count) for o in parsed.objects],
                       parsed.relation)
    kinds = ["colour", "shape"] + (["count"] if p.form == "count" else []) + (
        ["relation", "order"] if p.form == "position" else [])
    kind = kinds[rng.integers(len(kinds))]
    o = p.objects[rng.integers(len(p.objects))]
    if kind == "colour":
        o.color = rng.choice([c for c in S.COLORS if c != o.color])
    elif kind == "shape":
        o.shape = rng.choice([s for s in S.SHAPES if s != o.shape])
    elif kind == "count":
        o.count = int(rng.choice([n for n in S.COUNT_WORDS.values() if n != o.count]))
    elif kind == "relation":
        p.relation = {"to the left of": "to the right of", "to the right of": "to the left of",
                      "above": "below", "below": "above"}[p.relation]
    else:
        p.objects.reverse()
    return kind, S.format_prompt(p)


def test_mismatched_prompts_are_rejected():
    rng = np.random.default_rng(30)
    rejected, kinds_seen = {}, set()
    for task in S.TASK_TYPES:
        n_rej = 0
        for _ in range(150):
            scene = S.sample_scene(rng, task)
            kind, wrong = _mismatch(parse_prompt(scene.prompt), rng)
            kinds_seen.add(kind)
            v = V.verify(S.render(scene), wrong)
            n_rej += not v.passed
            assert v.passed == (v.score == 1.0)
        rejected[task] = n_rej / 150
    print(f"rejection of mismatched prompts: {rejected}")
    assert kinds_seen == {"colour", "shape", "count", "relation", "order"}
    assert min(rejected.values()) >= 0.97, f"per-task rejection rate: {rejected}"


# ----------------------------------------------------------------------------- hand-drawn images

def _drawing(size: int = 32) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    img = Image.new("RGB", (size, size), S.BACKGROUND)
    return img, ImageDraw.Draw(img)


def test_detects_shapes_drawn_by_another_renderer():
    # PIL's own primitives, not rlgen's masks: boxes are inclusive (x0, y0, x1, y1)
    img, draw = _drawing()
    draw.rectangle((2, 3, 11, 12), fill=S.COLORS["red"])  # 10x10 square centred (7, 8)
    draw.ellipse((18, 2, 29, 13), fill=S.COLORS["blue"])  # 12 px circle centred (24, 8)
    draw.polygon([(9, 18), (3, 29), (15, 29)], fill=S.COLORS["yellow"])  # apex-up triangle
    dets = sorted(V.detect_objects(np.asarray(img)), key=lambda d: (d.cy, d.cx))
    assert [(d.color, d.shape) for d in dets] == [("red", "square"), ("blue", "circle"), ("yellow", "triangle")]
    red, blue, _ = dets
    assert (red.cx, red.cy, red.area, red.bbox) == (7.0, 8.0, 100, (2, 3, 12, 13))
    assert (blue.cx, blue.cy) == (24.0, 8.0)
    assert V.verify(np.asarray(img), "a red square to the left of a blue circle").passed
    assert V.verify(np.asarray(img), "a red square above a yellow triangle").passed
    assert not V.verify(np.asarray(img), "a red square to the right of a blue circle").passed
    assert not V.verify(np.asarray(img), "a red square above a blue circle").passed  # same row


def test_partial_scores_count_sub_checks():
    img, draw = _drawing()
    draw.ellipse((2, 2, 11, 11), fill=S.COLORS["red"])
    draw.ellipse((20, 2, 29, 11), fill=S.COLORS["red"])
    image = np.asarray(img)
    cases = {  # prompt: (satisfied sub-checks, total) by the definition in the module docstring
        "a red circle": (3, 3),
        "a red square": (1, 3),  # some red; no square, no red square
        "a blue square": (0, 3),
        "two red circles": (4, 4),
        "three red circles": (3, 4),  # all but "exactly three"
        "a red circle and a blue circle": (4, 6),
        "a red circle to the left of a red circle": (7, 7),  # the two are distinct objects
        "a red circle above a red circle": (6, 7),
    }
    for prompt, (ok, total) in cases.items():
        v = V.verify(image, prompt)
        assert v.score == pytest.approx(ok / total), (prompt, v)
        assert v.passed == (ok == total) and v.form == parse_prompt(prompt).form, (prompt, v)


def test_background_and_specks_are_not_objects():
    img, draw = _drawing()
    assert V.detect_objects(np.asarray(img)) == []
    assert V.verify(np.asarray(img), "a red circle").score == 0.0
    draw.rectangle((4, 4, 13, 13), fill=S.COLORS["green"])
    for x, y, c in [(25, 25, "green"), (20, 5, "green"), (28, 10, "red"), (5, 27, "blue")]:
        draw.rectangle((x, y, x + 1, y + 1), fill=S.COLORS[c])  # 2x2 specks: noise, not objects
    assert V.verify(np.asarray(img), "one green square").passed
    # colours far from the palette and the background (black, white) are not objects
    draw.rectangle((18, 16, 23, 25), fill=(0, 0, 0))
    draw.rectangle((24, 16, 29, 25), fill=(255, 255, 255))
    assert [d.color for d in V.detect_objects(np.asarray(img))] == ["green"]


def test_accepts_model_space_tensors_and_rejects_other_inputs():
    scene = S.sample_scene(np.random.default_rng(40), "counting")
    image = S.render(scene)
    tensor = S.to_model_space(image)  # (3, H, W) in [-1, 1]
    assert V.detect_objects(tensor) == V.detect_objects(image)
    assert V.detect_objects(tensor.double().numpy()) == V.detect_objects(image)
    with pytest.raises(ValueError, match=r"expected a uint8 \(H, W, 3\) image"):
        V.detect_objects(image[:, :, 0])
    with pytest.raises(PromptError, match="'a red circle near a blue square'"):
        V.verify(image, "a red circle near a blue square")


# ----------------------------------------------------------------------------- rewards

def test_rewards_contract():
    # `_items`, not `get`: a lookup imports every built-in reward module (open_clip, ~10 s)
    assert REWARDS._items["shapes_verifier"] is V.shapes_verifier
    assert REWARDS._items["shapes_pass"] is V.shapes_pass
    imgs, prompts, _ = S.make_batch(np.random.default_rng(41), 12)
    wrong = prompts[1:] + prompts[:1]
    for samples in (imgs, [S.render(S.sample_scene(np.random.default_rng(i))) for i in range(3)]):
        n = len(samples)
        for fn in (V.shapes_verifier, V.shapes_pass):
            out = fn(samples, prompts[:n], step=3)
            assert isinstance(out, list) and len(out) == n
            assert all(isinstance(r, float) and 0.0 <= r <= 1.0 for r in out)
    assert V.shapes_verifier(imgs, prompts) == [1.0] * 12 == V.shapes_pass(imgs, prompts)
    partial, passed = V.shapes_verifier(imgs, wrong), V.shapes_pass(imgs, wrong)
    assert all((p == 1.0) == (s == 1.0) for p, s in zip(passed, partial))
    assert sum(passed) < 12 and all(s >= p for p, s in zip(passed, partial))
    with pytest.raises(ValueError, match="12 samples but 11 prompts"):
        V.shapes_verifier(imgs, prompts[:11])
    with pytest.raises(ValueError, match="single string"):
        V.shapes_pass(imgs[:1], "a red circle")
    with pytest.raises(PromptError, match="'a pink circle'"):
        V.shapes_pass(imgs[:1], ["a pink circle"])


def test_strict_mode_fails_extra_objects_and_keeps_the_rest():
    img, draw = _drawing()
    draw.ellipse((2, 2, 11, 11), fill=S.COLORS["red"])
    draw.ellipse((20, 2, 29, 11), fill=S.COLORS["red"])
    image = np.asarray(img)  # two red circles
    cases = {  # prompt: (lenient passes, strict (satisfied, total)): strict adds "exactly N objects in all"
        "a red circle": (True, (3, 4)),             # two copies: lenient passes, strict does not
        "two red circles": (True, (5, 5)),          # exactly what it names
        "three red circles": (False, (3, 5)),
        "a red circle to the left of a red circle": (True, (8, 8)),
        "a red circle and a blue circle": (False, (5, 7)),  # 2 objects named, 2 seen: the count check holds
    }
    for prompt, (lenient, (ok, total)) in cases.items():
        assert V.verify(image, prompt).passed == lenient, prompt
        v = V.verify(image, prompt, strict=True)
        assert v.score == pytest.approx(ok / total), (prompt, v)
        assert v.passed == (ok == total), (prompt, v)
    batch = [image, image]
    assert REWARDS.get("shapes_pass_strict")(batch, ["a red circle", "two red circles"]) == [0.0, 1.0]
    assert REWARDS.get("shapes_verifier_strict")(batch, ["a red circle", "two red circles"]) == \
        pytest.approx([0.75, 1.0])


def test_ground_truth_passes_strict_too():
    # the training renderer never draws a distractor: rendered ground truth holds exactly its objects
    rng = np.random.default_rng(3)
    for task in S.TASK_TYPES:
        scenes = [S.sample_scene(rng, task, 32) for _ in range(40)]
        ok = sum(V.verify(S.render(sc), sc.prompt, strict=True).passed for sc in scenes)
        assert ok >= 39, (task, ok)
