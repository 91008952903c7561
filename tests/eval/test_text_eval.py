"""Text benchmarks on a tiny (untrained) checkpoint: required keys, options, problems files."""
import json

import pytest
import torch

from rlgen.data.tokenizer import build_tokenizer
from rlgen.evaluate import EvalRequest, main, run_benchmark
from rlgen.models.masked_lm import MaskedDiffusionLM

# One thread: on a shared 2-core machine a second OpenMP thread waits ~30 ms per op for a core.
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("ckpt")
    MaskedDiffusionLM.tiny(build_tokenizer(), hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                           max_length=40).save_pretrained(d)
    return d


@pytest.mark.parametrize("task", ["arith", "countdown", "sudoku"])
def test_builtin_heldout_benchmark_returns_required_keys(ckpt, task):
    res = run_benchmark(task, EvalRequest(checkpoint=ckpt, device="cpu", progress=False,
                                          options={"n_per_level": 3}))
    for key in ("accuracy", "per_task", "n", "hard_accuracy", "nfe_per_token", "tokens_per_s", "settings"):
        assert key in res, key
    assert 0.0 <= res["accuracy"] <= 1.0
    from rlgen.data.text_tasks import get_task
    levels = get_task(task).levels
    assert res["n"] == 3 * len(levels) and set(res["per_task"]) == set(levels)
    assert res["nfe_per_token"] <= 1.0  # default: one token per step at most (eos can stop early)
    assert res["settings"]["temperature"] == 0.0 and res["settings"]["problems"] == "builtin-heldout"


def test_problems_file_and_decoding_options(ckpt, tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('{"task": "arith", "expression": "12+34"}\n{"task": "arith", "expression": "123*45"}\n')
    res = run_benchmark("arith", EvalRequest(checkpoint=ckpt, problems=p, device="cpu", progress=False,
                                             samples_per_prompt=2,
                                             options={"steps": 2, "temperature": 1.0, "remasking": "random"}))
    assert res["n"] == 4 and set(res["per_task"]) == {"pm2", "mul3x2"}
    assert "pass_at_2" in res
    # 3-slot and 5-slot answers decoded in 2 steps each: 2/3 and 2/5 forward passes per token
    assert res["nfe_per_token"] == pytest.approx((2 * 2 + 2 * 2) / (2 * 3 + 2 * 5), abs=1e-3)
    res = run_benchmark("arith", EvalRequest(checkpoint=ckpt, problems=p, device="cpu", progress=False,
                                             options={"threshold": 0.9}))
    assert res["settings"]["threshold"] == 0.9
    # a one-layer model: Fast-dLLM's dual cache decodes exactly what no cache does
    plain, dual = (run_benchmark("arith", EvalRequest(checkpoint=ckpt, problems=p, device="cpu", progress=False,
                                                      options={"cache": c})) for c in ("none", "dual"))
    assert dual["settings"]["cache"] == "dual" and dual["examples"] == plain["examples"]


def test_errors(ckpt, tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('{"task": "sudoku", "puzzle": "1.3..4.2.1.3.3.."}\n')
    with pytest.raises(ValueError, match="problem 1 is a 'sudoku' problem"):
        run_benchmark("arith", EvalRequest(checkpoint=ckpt, problems=p, device="cpu", progress=False))
    with pytest.raises(ValueError, match="unknown option"):
        run_benchmark("arith", EvalRequest(checkpoint=ckpt, device="cpu", progress=False, options={"stepz": 3}))


def test_cli_writes_json(ckpt, tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = main(["--checkpoint", str(ckpt), "--benchmark", "countdown", "--device", "cpu", "--no-progress",
               "--set", "n_per_level=2", "--set", "levels=n3", "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["n"] == 2 and res["benchmark"] == "countdown" and list(res["per_task"]) == ["n3"]
