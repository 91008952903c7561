"""python -m rlgen.pairs build: sampled, scored pairs round-trip through the pair format (images with
a contact sheet, and text); pair selection rules."""
import json

import pytest
import torch

from rlgen.data.pairs import load_pairs, read_image
from rlgen.pairs import main, select_pairs
from tests_helpers import tiny_flow_policy

pytestmark = pytest.mark.usefixtures("one_thread")


def test_select_best_worst_and_ranked():
    s = torch.tensor([[0.2, 1.0, 0.2, 0.5], [0.5, 0.5, 0.5, 0.5], [float("nan"), 0.0, 1.0, float("nan")]])
    assert select_pairs(s) == [(0, 1, 0), (2, 2, 1)]  # ties: lowest index; equal scores: no pair
    assert select_pairs(s, margin=0.9) == [(2, 2, 1)]
    ranked = select_pairs(s, "ranked", margin=0.25)
    assert sorted(ranked) == [(0, 1, 0), (0, 1, 2), (0, 1, 3), (0, 3, 0), (0, 3, 2), (2, 2, 1)]
    with pytest.raises(ValueError):
        select_pairs(s, "all")


def test_build_image_pairs_round_trip(tmp_path):
    ckpt = tiny_flow_policy(tmp_path / "policy")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n# a comment\na blue square\n")
    out = tmp_path / "pairs"
    assert main(["build", "--checkpoint", str(ckpt), "--reward", "rewards.examples:brightness", "--prompts",
                 str(prompts), "--samples-per-prompt", "3", "--num-steps", "2", "--out", str(out),
                 "--device", "cpu"]) == 0
    info = json.loads((out / "build.json").read_text())
    assert info["pairs"] == 2 and info["modality"] == "image" and (out / "contact_sheet.png").is_file()
    pairs = load_pairs(out / "pairs.jsonl", image_size=32)
    assert [r.prompt for r in pairs.rows] == ["a red circle", "a blue square"]
    for r in pairs.rows:
        assert r.chosen_score > r.rejected_score
        # the reward read back from the written PNGs orders the pair the same way (lossless PNG)
        from rewards.examples import brightness

        got = brightness(torch.stack([r.chosen_image, r.rejected_image]), [r.prompt] * 2)
        assert got[0] > got[1]
        assert torch.equal(read_image(out / r.chosen), r.chosen_image)


def test_build_text_pairs_round_trip(tmp_path):
    from rlgen.data.tokenizer import build_tokenizer
    from rlgen.models.masked_lm import MaskedDiffusionLM

    torch.manual_seed(0)
    MaskedDiffusionLM.tiny(build_tokenizer(), hidden_size=32, num_layers=1, num_heads=2,
                           intermediate_size=64).save_pretrained(tmp_path / "lm")
    out = tmp_path / "pairs"
    assert main(["build", "--checkpoint", str(tmp_path / "lm"), "--reward", "arith_partial", "--prompts", "arith:12",
                 "--samples-per-prompt", "4", "--temperature", "2.0", "--out", str(out), "--device", "cpu"]) == 0
    info = json.loads((out / "build.json").read_text())
    assert info["modality"] == "text" and info["pairs"] >= 1
    pairs = load_pairs(out / "pairs.jsonl")
    from rewards.text_verifiers import verify_arith

    for r in pairs.rows:
        problem = r.meta["problem"]
        assert r.prompt == problem["expression"] + "=" and r.meta["gen_length"] == 3
        assert r.chosen_score > r.rejected_score  # scores are the reward's float32 values
        assert verify_arith(problem, r.chosen, partial=True) == pytest.approx(r.chosen_score, rel=1e-6)
        assert verify_arith(problem, r.rejected, partial=True) == pytest.approx(r.rejected_score, abs=1e-7)


def test_check_command(tmp_path, capsys):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "a", "chosen": "x", "rejected": "y"}) + "\n[]\n")
    assert main(["check", str(f)]) == 2
    assert "row 2" in capsys.readouterr().err
    assert main(["check", str(f), "--on-error", "skip"]) == 0
    assert "1 text pairs, 1 skipped (not_an_object: 1)" in capsys.readouterr().out
