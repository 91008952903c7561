"""Shapes dataset: grammar, layout invariants, determinism, batches."""
import time

import numpy as np
import pytest
import torch

from rlgen.data import shapes as S
from rlgen.data.shapes import ObjectSpec, ParsedPrompt, PromptError, parse_prompt
from rlgen.registry import DATASETS


# ----------------------------------------------------------------------------- grammar

@pytest.mark.parametrize("prompt, expected", [
    ("a red circle", ParsedPrompt("single", [ObjectSpec("circle", "red")])),
    ("an orange square", ParsedPrompt("single", [ObjectSpec("square", "orange")])),
    ("a purple triangle and an orange circle",
     ParsedPrompt("pair", [ObjectSpec("triangle", "purple"), ObjectSpec("circle", "orange")])),
    ("three green triangles", ParsedPrompt("count", [ObjectSpec("triangle", "green", 3)])),
    ("one green triangle", ParsedPrompt("count", [ObjectSpec("triangle", "green", 1)])),
    ("four yellow squares", ParsedPrompt("count", [ObjectSpec("square", "yellow", 4)])),
    ("a red circle to the left of a blue square",
     ParsedPrompt("position", [ObjectSpec("circle", "red"), ObjectSpec("square", "blue")], "to the left of")),
    ("a red circle to the right of a blue square",
     ParsedPrompt("position", [ObjectSpec("circle", "red"), ObjectSpec("square", "blue")], "to the right of")),
    ("a blue square above a red circle",
     ParsedPrompt("position", [ObjectSpec("square", "blue"), ObjectSpec("circle", "red")], "above")),
    ("a blue square below a red circle",
     ParsedPrompt("position", [ObjectSpec("square", "blue"), ObjectSpec("circle", "red")], "below")),
])
def test_parse_every_form(prompt, expected):
    assert parse_prompt(prompt) == expected


def test_parse_tolerates_case_whitespace_and_full_stop():
    want = parse_prompt("a red circle to the left of a blue square")
    for variant in ["A Red Circle to the LEFT of a Blue Square.", "  a red   circle\tto the left of a blue square .  ",
                    "a red circle to the left of a blue square."]:
        assert parse_prompt(variant) == want


@pytest.mark.parametrize("prompt, hint", [
    ("a pink circle", "pink"),
    ("five red squares", "five"),
    ("a red circle near a blue square", "near"),
    ("", "empty"),
    ("   ", "empty"),
    ("three red square", "squares"),  # count/noun agreement
    ("one red squares", "'square'"),
    ("red a circle", "wrong order"),
])
def test_parse_rejects_outside_grammar_with_clear_message(prompt, hint):
    with pytest.raises(PromptError) as err:
        parse_prompt(prompt)
    msg = str(err.value)
    assert repr(prompt) in msg, msg  # quotes the prompt
    assert hint in msg, msg  # says what was wrong
    assert "expected" in msg or "needs" in msg, msg
    assert isinstance(err.value, ValueError)


def test_every_caption_round_trips_and_matches_its_task():
    forms = {"single_object": "single", "colors": "single", "two_object": "pair", "color_attr": "pair",
             "counting": "count", "position": "position"}
    for task in S.TASK_TYPES:
        captions = S.all_prompts(task)
        assert len(set(captions)) == len(captions), task
        for c in captions:
            p = parse_prompt(c)
            assert p.form == forms[task] and S.format_prompt(p) == c, (task, c)
            if task in ("two_object", "color_attr"):
                assert p.objects[0].shape != p.objects[1].shape, c
            if task == "color_attr":
                assert p.objects[0].color != p.objects[1].color, c
    # counts of captions from the vocabulary: 6 colours x 3 shapes = 18 objects
    assert len(S.all_prompts("single_object")) == 18
    assert len(S.all_prompts("counting")) == 18 * 4
    assert len(S.all_prompts("two_object")) == 6 * 6 * 3 * 2
    assert len(S.all_prompts("color_attr")) == 6 * 5 * 3 * 2
    assert len(S.all_prompts("position")) == 18 * 17 * 4


def test_sample_prompt_respects_task_and_covers_all_tasks():
    rng = np.random.default_rng(0)
    seen = {S.sample_prompt(rng)[1] for _ in range(300)}
    assert seen == set(S.TASK_TYPES)
    for task in S.TASK_TYPES:
        prompt, t = S.sample_prompt(rng, task)
        assert t == task and prompt in S.all_prompts(task)
    with pytest.raises(ValueError, match="unknown shapes task 'colours'"):
        S.sample_prompt(rng, "colours")


# ----------------------------------------------------------------------------- scenes

def _only_palette_pixels(img: np.ndarray) -> bool:
    allowed = np.array([S.BACKGROUND, *S.COLORS.values()])  # (7, 3)
    return bool((img.reshape(-1, 1, 3) == allowed).all(-1).any(-1).all())


def _box_gap(a, b) -> float:
    """Empty pixels between two objects' boxes along the better axis."""
    dx = abs(a.cx - b.cx) - (a.size + b.size) / 2
    dy = abs(a.cy - b.cy) - (a.size + b.size) / 2
    return max(dx, dy)


@pytest.mark.parametrize("image_size", [32, 64])
def test_scenes_show_exactly_their_caption_without_overlap(image_size):
    rng = np.random.default_rng(1)
    for task in S.TASK_TYPES:
        for _ in range(40):
            scene = S.sample_scene(rng, task, image_size)
            parsed = parse_prompt(scene.prompt)
            want = sorted((o.color, o.shape) for o in parsed.objects for _ in range(o.count))
            assert sorted((o.color, o.shape) for o in scene.objects) == want, scene
            for i, a in enumerate(scene.objects):
                assert image_size / 4 - 1 <= a.size <= image_size * 3 / 8 + 1, scene
                assert a.size / 2 <= a.cx <= image_size - a.size / 2, scene
                assert a.size / 2 <= a.cy <= image_size - a.size / 2, scene
                for b in scene.objects[i + 1:]:
                    assert _box_gap(a, b) >= image_size / 16 - 1e-9, scene
            img = S.render(scene)
            assert img.shape == (image_size, image_size, 3) and img.dtype == np.uint8
            assert _only_palette_pixels(img)
            # each object's centre pixel (inside all three shapes) shows its colour, and every
            # colour covers exactly the area of its objects' masks (nothing overwritten)
            for o in scene.objects:
                assert tuple(img[int(o.cy), int(o.cx)]) == S.COLORS[o.color], (scene, o)
            for color, rgb in S.COLORS.items():
                area = int((img == rgb).all(-1).sum())
                want = sum(int(S.shape_mask(o.shape, o.size).sum()) for o in scene.objects if o.color == color)
                assert area == want, (scene, color)


def test_position_scenes_satisfy_their_relation():
    rng = np.random.default_rng(2)
    for _ in range(200):
        scene = S.sample_scene(rng, "position")
        rel = parse_prompt(scene.prompt).relation
        a, b = scene.objects
        assert S.relation_holds((a.cx, a.cy), (a.size, a.size), (b.cx, b.cy), (b.size, b.size), rel), scene


def test_relation_rule():
    d = (10, 10)
    assert S.relation_holds((0, 0), d, (12, 0), d, "to the left of")
    assert S.relation_holds((12, 0), d, (0, 0), d, "to the right of")
    assert S.relation_holds((0, 0), d, (0, 12), d, "above")  # y grows downwards
    assert S.relation_holds((0, 12), d, (0, 0), d, "below")
    assert not S.relation_holds((0, 0), d, (12, 0), d, "to the right of")
    assert not S.relation_holds((0, 0), d, (12, 0), d, "above")
    # 45° away: both directions hold (the cone is 60° wide), far off-axis only one
    assert S.relation_holds((0, 0), d, (12, 12), d, "to the left of")
    assert S.relation_holds((0, 0), d, (12, 12), d, "above")
    assert not S.relation_holds((0, 0), d, (3, 12), d, "to the left of")
    # nearly aligned centres: the 0.1·(size A + size B) slack leaves no relation
    assert not S.relation_holds((0, 0), d, (1.5, 0), d, "to the left of")
    with pytest.raises(ValueError, match="unknown relation 'near'"):
        S.relation_holds((0, 0), d, (12, 0), d, "near")


def test_four_objects_fit_and_sizes_scale():
    rng = np.random.default_rng(3)
    for size in (16, 32, 48, 64):
        for _ in range(30):
            scene = S.scene_for_prompt(rng, "four red squares", size)
            assert len(scene.objects) == 4 and scene.image_size == size
    with pytest.raises(ValueError, match="image_size must be"):
        S.sample_scene(rng, "counting", 8)


def test_render_speed_is_reported():
    rng = np.random.default_rng(4)
    n = 500
    t = time.perf_counter()
    for _ in range(n):
        S.render(S.sample_scene(rng))
    per = (time.perf_counter() - t) / n * 1e3
    print(f"sample_scene + render: {per:.3f} ms per 32x32 image")


# ----------------------------------------------------------------------------- dataset

def test_dataset_is_deterministic_and_seeded():
    a, b, c = S.ShapesDataset(50, seed=7), S.ShapesDataset(50, seed=7), S.ShapesDataset(50, seed=8)
    for i in (0, 13, 49):
        x, y = a[i], b[i]
        assert torch.equal(x["image"], y["image"]) and x["prompt"] == y["prompt"] and x["task"] == y["task"]
    assert torch.equal(a[-1]["image"], a[49]["image"])
    assert any(a[i]["prompt"] != c[i]["prompt"] for i in range(10))
    assert any(not torch.equal(a[i]["image"], c[i]["image"]) for i in range(10))
    item = a[3]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert item["image"].min() >= -1 and item["image"].max() <= 1
    assert item["task"] in S.TASK_TYPES and parse_prompt(item["prompt"])
    with pytest.raises(IndexError, match="out of range"):
        a[50]


def test_dataset_options_and_registry():
    # `_items`, not `get`: a lookup imports every built-in dataset module (transformers, ~10 s)
    assert DATASETS._items["shapes"] is S.ShapesDataset
    ds = S.ShapesDataset(20, seed=1, image_size=48, tasks=["counting", "position"])
    assert len(ds) == 20
    items = [ds[i] for i in range(20)]
    assert {it["task"] for it in items} <= {"counting", "position"}
    assert items[0]["image"].shape == (3, 48, 48)
    # the image decodes back to palette pixels exactly: -1 = 0, +1 = 255
    for it in items:
        u8 = torch.round((it["image"] + 1) * 127.5).to(torch.uint8).permute(1, 2, 0).numpy()
        assert _only_palette_pixels(u8)
    with pytest.raises(ValueError, match="unknown shapes task"):
        S.ShapesDataset(5, tasks=["colour"])


def test_make_batch():
    imgs, prompts, tasks = S.make_batch(np.random.default_rng(5), 64, tasks=["colors", "counting"])
    assert imgs.shape == (64, 3, 32, 32) and imgs.dtype == torch.float32
    assert imgs.min() >= -1 and imgs.max() <= 1
    assert len(prompts) == len(tasks) == 64 and set(tasks) == {"colors", "counting"}
    again = S.make_batch(np.random.default_rng(5), 64, tasks=["colors", "counting"])
    assert torch.equal(imgs, again[0]) and prompts == again[1]
    assert all(t in ("colors", "counting") and parse_prompt(p) for p, t in zip(prompts, tasks))


def test_heldout_prompts_deterministic_and_covering():
    h = S.heldout_prompts()
    assert h == S.heldout_prompts() and h != S.heldout_prompts(seed=1)
    assert len(h) == 32 * 6
    for task in S.TASK_TYPES:
        mine = [p for p, t in h if t == task]
        assert len(mine) == 32
        assert set(mine) <= set(S.all_prompts(task))
        # as many distinct captions as the task has, up to 32
        assert len(set(mine)) == min(32, len(S.all_prompts(task))), task
