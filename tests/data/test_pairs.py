"""Pair files: a valid file loads (JSONL and parquet); every malformed-row kind is reported with its
row number, stops a strict load and is dropped and counted by a skip load."""
import json

import pytest
import torch

from rlgen.data.pairs import PairFormatError, load_pairs, pair_record, write_image, write_pairs


def image(value, size=8):
    return torch.full((3, size, size), value)


@pytest.fixture
def image_dir(tmp_path):
    for name, v in (("a.png", -1.0), ("b.png", 1.0), ("c.png", 0.0)):
        write_image(image(v), tmp_path / "images" / name)
    write_image(image(0.0, size=16), tmp_path / "images" / "big.png")
    (tmp_path / "images" / "corrupt.png").write_bytes(b"not a png")
    return tmp_path


def good(i=0):
    return {"prompt": f"a red circle {i}", "chosen": "images/a.png", "rejected": "images/b.png",
            "chosen_score": 1.0, "rejected_score": 0.0, "meta": {"task": "single_object"}}


def write_lines(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_valid_image_pairs(image_dir):
    f = write_lines(image_dir / "pairs.jsonl", [good(0), "", good(1)])
    pairs = load_pairs(f, image_size=8)
    assert pairs.modality == "image" and len(pairs) == 2 and pairs.skipped == {}
    assert [r.row for r in pairs.rows] == [1, 3]  # rows are line numbers; blank lines are skipped
    w, l = pairs.images()
    assert w.shape == (2, 3, 8, 8) and torch.allclose(w, torch.full_like(w, -1.0)) and torch.allclose(l, torch.ones_like(l))
    assert pairs.rows[0].chosen_score == 1.0 and pairs.rows[0].meta == {"task": "single_object"}
    assert load_pairs(image_dir).path == f  # a folder means its pairs.jsonl


BAD_ROWS = [
    ("invalid_json", '{"prompt": "x", ', "invalid JSON"),
    ("not_an_object", "[1, 2]", "expected a JSON object"),
    ("missing_field", {"prompt": "p", "chosen": "images/a.png"}, "missing field 'rejected'"),
    ("wrong_type", {**good(), "prompt": 3}, "'prompt' must be a string"),
    ("wrong_type", {**good(), "chosen_score": "high"}, "'chosen_score' must be a finite number"),
    ("empty_text", {**good(), "prompt": "  "}, "'prompt' is empty"),
    ("unreadable_image", {**good(), "rejected": "images/missing.png"}, "not found"),
    ("unreadable_image", {**good(), "rejected": "images/corrupt.png"}, "cannot read rejected image"),
    ("wrong_size", {**good(), "rejected": "images/big.png"}, "is 16×16, expected 8×8"),
    ("identical_pair", {**good(), "rejected": "images/a.png"}, "identical"),
    ("duplicate", good(0), "duplicate of row 1"),
]


@pytest.mark.parametrize("kind,row,message", BAD_ROWS, ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(BAD_ROWS)])
def test_malformed_row_strict_and_skip(image_dir, kind, row, message):
    f = write_lines(image_dir / "pairs.jsonl", [good(0), good(1), row, good(2)])
    with pytest.raises(PairFormatError, match=f"row 3: .*{message}") as e:
        load_pairs(f, image_size=8)
    assert e.value.kind == kind and e.value.row == 3
    pairs = load_pairs(f, on_error="skip", image_size=8)
    assert len(pairs) == 3 and pairs.skipped == {kind: 1}
    assert "row 3" in pairs.errors[0] and "1 skipped" in pairs.summary()


def test_empty_text_completion(tmp_path):
    f = write_lines(tmp_path / "p.jsonl", [{"prompt": "12+34=", "chosen": "64", "rejected": ""}])
    with pytest.raises(PairFormatError, match="row 1: field 'rejected' is empty"):
        load_pairs(f)


def test_text_pairs_and_parquet_round_trip(tmp_path):
    recs = [pair_record("12+34=", "64", "54", 1.0, 0.0, {"gen_length": 3}), pair_record("01+01=", "20", "30")]
    for name in ("p.jsonl", "p.parquet"):
        path = write_pairs(tmp_path / name, recs)
        pairs = load_pairs(path)
        assert pairs.modality == "text" and [r.chosen for r in pairs.rows] == ["64", "20"]
        assert pairs.rows[0].meta == {"gen_length": 3} and pairs.rows[1].chosen_score is None
        assert [r.row for r in pairs.rows] == [1, 2]


def test_parquet_rows_are_validated(tmp_path):
    path = write_pairs(tmp_path / "p.parquet", [pair_record("a", "x", "y"), pair_record("b", "z", "z")])
    with pytest.raises(PairFormatError, match="row 2: chosen and rejected are identical"):
        load_pairs(path)


def test_nothing_valid_is_an_error(tmp_path):
    f = write_lines(tmp_path / "p.jsonl", ["[]"])
    with pytest.raises(PairFormatError, match="no valid pairs"):
        load_pairs(f, on_error="skip")
    with pytest.raises(PairFormatError, match="not found"):
        load_pairs(tmp_path / "nope.jsonl")


@pytest.fixture
def pairs_dir(tmp_path):
    """tmp/set/{images/a.png, images/b.png} beside a file outside the set, tmp/secret.png, and a
    symlink inside the set that points at it."""
    d = tmp_path / "set"
    for name, v in (("a.png", -1.0), ("b.png", 1.0)):
        write_image(image(v), d / "images" / name)
    write_image(image(0.5), tmp_path / "secret.png")
    (d / "images" / "link.png").symlink_to(tmp_path / "secret.png")
    return d


@pytest.mark.parametrize("side", ["chosen", "rejected"])
@pytest.mark.parametrize("path", ["../secret.png", "images/../../secret.png", "ABS", "images/link.png"])
def test_pair_images_outside_the_folder_are_refused(pairs_dir, side, path):
    path = str(pairs_dir.parent / "secret.png") if path == "ABS" else path
    f = write_lines(pairs_dir / "pairs.jsonl", [good(0), {**good(1), side: path}])
    with pytest.raises(PairFormatError, match=rf"^{f}: row 2: {side} image '{path}' is outside the image folder") as e:
        load_pairs(f)
    assert e.value.kind == "image_outside_root" and e.value.row == 2 and len(str(e.value).splitlines()) == 1
    assert load_pairs(f, on_error="skip").skipped == {"image_outside_root": 1}


def test_pair_images_resolve_inside_an_explicit_image_root(pairs_dir, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    f = write_lines(tmp_path / "elsewhere" / "pairs.jsonl", [good(0)])
    with pytest.raises(PairFormatError, match="not found"):  # relative to the pairs file's own folder
        load_pairs(f)
    pairs = load_pairs(f, image_root=pairs_dir)
    assert len(pairs) == 1 and torch.allclose(pairs.images()[0], torch.full((1, 3, 8, 8), -1.0))
    f = write_lines(f, [{**good(0), "chosen": "../secret.png"}])
    with pytest.raises(PairFormatError, match=rf"outside the image folder {pairs_dir}"):
        load_pairs(f, image_root=pairs_dir)
