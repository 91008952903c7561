"""``python -m rlgen.evaluate`` on Hugging Face folders: DiffusionGemma decodes a text benchmark with its
own sampler (the answers are what transformers' own ``generate`` writes for the same seed), and a
remote-code LLaDA folder is scored only with ``--trust-remote-code``."""
import json

import pytest
import torch

import rlgen  # noqa: F401

from rlgen import evaluate
from rlgen.models import load_model
from rlgen.testing.tiny_lms import build_tiny_diffusion_gemma, build_tiny_llada2

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_eval")
    return {"dgemma": build_tiny_diffusion_gemma(root / "dg"), "llada2": build_tiny_llada2(root / "l2", init_std=0.5)}


def test_diffusion_gemma_answers_come_from_its_own_generate(folders):
    model = load_model(folders["dgemma"])
    ids = model.tokenizer(["98+76=", "11+22="], add_special_tokens=False)["input_ids"]
    assert len(ids[0]) == len(ids[1])  # one prompt length: transformers' generate takes no padding here
    prompt = torch.tensor(ids)
    answers = model.generate_answers(prompt, 3, generator=torch.Generator().manual_seed(5))
    seed = int(torch.randint(2**31 - 1, (1,), generator=torch.Generator().manual_seed(5)))
    torch.manual_seed(seed)  # the reference: transformers' own sampler on that seed
    ref = model.net.generate(prompt, max_new_tokens=3, return_dict_in_generate=True).sequences
    assert answers.shape == (2, 3) and torch.equal(answers, ref[:, prompt.shape[1]:prompt.shape[1] + 3])


@pytest.mark.parametrize("kind,flags", [("dgemma", []), ("llada2", ["--trust-remote-code"])])
def test_evaluate_cli_scores_hugging_face_folders(kind, flags, folders, tmp_path, capsys):
    out = tmp_path / f"{kind}.json"
    argv = ["--checkpoint", str(folders[kind]), "--benchmark", "arith", "--set", "n_per_level=2", "--no-progress",
            "--out", str(out), *flags]
    assert evaluate.main(argv) == 0
    res = json.loads(out.read_text())
    assert res["n"] == 4 and 0 <= res["accuracy"] <= 1 and set(res["per_task"]) == {"pm1@2", "pm2"}
    assert len(res["examples"]) == 4 and res["checkpoint"] == str(folders[kind])
    assert evaluate.main(argv) == 0 and json.loads(out.read_text())["examples"] == res["examples"]  # seeded


def test_remote_code_folder_needs_the_flag(folders, capsys):
    assert evaluate.main(["--checkpoint", str(folders["llada2"]), "--benchmark", "arith", "--no-progress"]) == 2
    assert "--trust-remote-code" in capsys.readouterr().err
