"""python -m rlgen.sample writes one PNG per prompt and a grid, for pipeline folders and rlgen checkpoints."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from rlgen.sample import main

pytestmark = pytest.mark.usefixtures("one_thread")


def test_pipeline_folder(tiny_pipelines, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a photo of a cat\n\n# comment\na blue house\n")
    out = tmp_path / "out"
    assert main(["--checkpoint", str(tiny_pipelines["sd3"]), "--prompts", str(prompts), "--out", str(out),
                 "--num-steps", "2", "--cfg", "3", "--seed", "5"]) == 0
    meta = json.loads((out / "samples.json").read_text())
    assert [s["prompt"] for s in meta["samples"]] == ["a photo of a cat", "a blue house"]
    first = np.asarray(Image.open(out / meta["samples"][0]["file"]))
    assert first.shape == (64, 64, 3) and (out / "grid.png").is_file()
    # the PNG is the policy's decoded sample for the same seed
    from rlgen.models import load_model
    from rlgen.viz import to_uint8

    want = load_model(tiny_pipelines["sd3"]).generate(["a photo of a cat", "a blue house"], num_steps=2, cfg_scale=3,
                                                      generator=torch.Generator().manual_seed(5))
    assert np.abs(to_uint8(want)[0].astype(int) - first.astype(int)).max() <= 1


def test_rlgen_flow_checkpoint(tmp_path):
    from rlgen.models.flow import FlowModelConfig, FlowPolicy

    torch.manual_seed(0)
    FlowPolicy.build(FlowModelConfig(vocab=["a", "red", "circle"])).save_pretrained(tmp_path / "ckpt")
    (tmp_path / "p.txt").write_text("a red circle\n")
    assert main(["--checkpoint", str(tmp_path / "ckpt"), "--prompts", str(tmp_path / "p.txt"),
                 "--out", str(tmp_path / "o"), "--num-steps", "2"]) == 0
    assert np.asarray(Image.open(tmp_path / "o" / "000_a_red_circle.png")).shape == (32, 32, 3)


def test_bad_input_is_one_line(tmp_path, capsys):
    (tmp_path / "p.txt").write_text("x\n")
    assert main(["--checkpoint", str(tmp_path), "--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "model_index.json" in err
