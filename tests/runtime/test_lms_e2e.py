"""Hugging Face diffusion LMs through ``train_rl.py`` on the one runtime: text GRPO (d1 on a LLaDA
layout, coupled on a Dream layout, trajectory on a LLaDA2 block-causal layout), VRPO and text OPD each
run 2 steps and resume for a third on tiny random-weight models saved as their Hub folders are
(remote code behind ``policy.trust_remote_code=true``), with LoRA, a JSONL dataset (chat template where
the tokenizer has one) and the ``math_answer`` reward. Each checkpoint is a LoRA adapter that
``load_model`` rebuilds on its own.

Every case starts a Ray cluster and a DeepSpeed learner twice (minutes on a shared CPU): slow. The
start-up refusals at the end run no cluster and stay in the default suite.
"""
import json

import pytest
import torch

import train_rl
from rlgen.models.lora import adapters_disabled
from rlgen.runtime.rundir import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")
COMMON = ["run.progress=false", "run.tensorboard=false", "run.device=cpu", "train.save_every=1", "train.max_minutes=0",
          "resources.rollout_threads=1", "resources.learner_threads=1", "ray.num_cpus=3", "eval.benchmark=",
          "policy.trust_remote_code=true", "policy.lora.rank=4", "train.grid_every=1"]
ROWS = [{"question": f"What is {a} + {b}?", "answer": str(a + b), "level": "easy" if a < 5 else "hard"}
        for a, b in [(1, 2), (3, 4), (5, 6), (7, 1), (2, 2), (9, 9), (4, 3), (6, 0)]]
CHAT = {"llada": False, "dream": True, "llada2": True}  # the LLaDA layout is a base model: no chat template


@pytest.fixture(scope="module")
def lms(tmp_path_factory):
    from rlgen.testing.tiny_lms import build_tiny_dream, build_tiny_llada, build_tiny_llada2

    root = tmp_path_factory.mktemp("lms")
    out = {}
    for kind, build in (("llada", build_tiny_llada), ("dream", build_tiny_dream), ("llada2", build_tiny_llada2)):
        out[kind] = build(root / kind, seed=0, init_std=0.5)
        out[kind + "_teacher"] = build(root / (kind + "_teacher"), seed=1, init_std=0.5)  # same tokenizer
    from rlgen.testing.tiny_lms import CHATML_TEMPLATE, build_bpe_tokenizer, build_tiny_diffusion_gemma

    # the LLaDA2 layout's own tokenizer: a DiffusionGemma teacher on the same token ids
    tok = build_bpe_tokenizer(["<|endoftext|>", "<|mask|>", "<|im_start|>", "<|im_end|>"], mask="<|mask|>",
                              chat_template=CHATML_TEMPLATE)
    out["llada2_dgemma"] = build_tiny_diffusion_gemma(root / "dgemma", tokenizer=tok)
    data = root / "math.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    pairs = root / "pairs.jsonl"  # one prompt length per template: every pair batch is one bucket
    pairs.write_text("".join(json.dumps({"prompt": r["question"], "chosen": f"The answer is {r['answer']}.",
                                         "rejected": f"The answer is {int(r['answer']) + 1}."}) + "\n" for r in ROWS))
    return {**out, "data": data, "pairs": pairs}


def job_args(kind: str, algo: str, lms) -> list[str]:
    model = [f"policy.checkpoint={lms[kind]}"]
    if algo == "vrpo":
        return ["configs/dpo/vrpo_arith.yaml", *model, f"pairs.path={lms['pairs']}", "pairs.per_step=4",
                "pairs.batch=2", "algo.n_samples=2", "learner.micro_batch_size=2"]
    data = (f"prompts.dataset={{path: {lms['data']}, prompt_column: question, gen_length: 8, "
            f"chat_template: {str(CHAT[kind]).lower()}}}")
    # math_answer is what the test is about; a dense reward beside it gives every group signal
    online = [*model, "prompts.source=dataset", data, "prompts.per_step=2", "prompts.group_size=4",
              "rewards={math_answer: 1.0, 'tests.runtime.text_rewards:digit_fraction': 1.0}"]
    if algo == "mdm_opd":
        return ["configs/opd/mdm_opd_arith.yaml", *online, f"algo.teacher={lms[kind + '_teacher']}"]
    if algo == "mdm_opd_dgemma":  # DiffusionGemma's canvas scores of the sampled answers
        return ["configs/opd/mdm_opd_arith.yaml", *online, f"algo.teacher={lms[kind + '_dgemma']}",
                "algo.teacher_kind=sequence"]
    estimator = {"llada": "d1", "dream": "coupled", "llada2": "trajectory"}[kind]
    # the Dream case also asks for bf16 (ignored on CPU, one line) and gradient checkpointing on the learner
    scale = ["policy.dtype=bfloat16", "policy.gradient_checkpointing=true"] if kind == "dream" else []
    return ["configs/rl/mdm_grpo_arith.yaml", *online, f"algo.estimator={estimator}", *scale]


def adapter(ckpt) -> dict:
    from safetensors.torch import load_file

    return load_file(str(ckpt / "adapter_model.safetensors"))


def check_run(run, steps: int, kind: str, lms):
    from rlgen.models import load_model

    rows = read_metrics(run)
    assert [r["step"] for r in rows] == list(range(steps + 1))
    assert all("loss" in r and "grad_norm" in r for r in rows[1:])
    ckpts = run / "checkpoints"
    meta = json.loads((ckpts / str(steps) / "rlgen_model.json").read_text())
    assert meta["lora_base"] == str(lms[kind].resolve())  # an adapter and a pointer to its base
    assert not (ckpts / str(steps) / "model.safetensors").exists()
    first, last = adapter(ckpts / "0"), adapter(ckpts / str(steps))
    assert first.keys() == last.keys() and all("lora_" in k for k in last)
    assert max((first[k] - last[k]).abs().max().item() for k in last) > 0  # the adapter trained
    base = load_model(lms[kind], trust_remote_code=True)
    again = load_model(ckpts / str(steps), trust_remote_code=True)  # loads on its own: base + adapter
    assert again.conventions == base.conventions
    x = torch.randint(5, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        differs = (again(x) - base(x)).abs().max().item()
        with adapters_disabled(again):
            same = (again(x) - base(x)).abs().max().item()
    assert differs > 0 and same == 0  # the base is untouched, the adapter is what changed
    return rows


CASES = [("llada", "mdm_grpo"), ("dream", "mdm_grpo"), ("llada2", "mdm_grpo"), ("llada", "vrpo"), ("dream", "vrpo"),
         ("llada2", "vrpo"), ("llada", "mdm_opd"), ("dream", "mdm_opd"), ("llada2", "mdm_opd"),
         ("llada2", "mdm_opd_dgemma")]


@pytest.mark.slow
@pytest.mark.parametrize("kind,algo", CASES)
def test_two_steps_then_resume(kind, algo, lms, tmp_path):
    config, *extra = job_args(kind, algo, lms)
    base = ["--config", config, f"run.root={tmp_path}", f"run.name={kind}_{algo}", *COMMON, *extra]
    assert train_rl.main([*base, "train.steps=2"]) == 0
    run = tmp_path / f"{kind}_{algo}"
    rows = check_run(run, 2, kind, lms)
    if algo.startswith("mdm_opd"):
        assert "distill_kl" in rows[1]
    if algo != "vrpo":
        assert "reward/math_answer" in rows[1]
        samples = (run / "samples" / "train_00001.txt").read_text()
        assert ("'role': 'assistant'" in samples) == CHAT[kind]  # conversational completions under a template
    assert train_rl.main([*base, "train.steps=3", "run.resume=auto"]) == 0
    check_run(run, 3, kind, lms)
    assert json.loads((run / "checkpoints" / "3" / "driver_state.json").read_text())["step"] == 3


# ----------------------------------------------------------------------------------------------
# Refused at start-up: one line, exit 2, before the run folder exists (no cluster starts)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case,extra,message", [
    ("llada2_d1", [], "algo.estimator=d1 does not estimate a block-causal policy's log-probs"),
    ("llada2_blocks", ["algo.estimator=trajectory", "rollout.block_length=8"],
     "rollout.block_length=8 differs from the block size the policy attends in (4)"),
    ("llada_chat", ["prompts.dataset.chat_template=true"],
     "prompts.dataset.chat_template=true, but the tokenizer of"),
    ("llada_column", ["rewards={'trl.rewards:accuracy_reward': 1.0}"],
     "reward 'trl.rewards:accuracy_reward' needs column 'solution', which prompts.dataset.path"),
    ("llada_code", ["rewards={math_answer: 1.0}", "reward_kwargs={math_answer: {answer_column: final}}"],
     "reward 'math_answer' needs column 'final'"),
    ("dream_trust", ["policy.trust_remote_code=false"], "policy.trust_remote_code=true"),
])
def test_bad_text_jobs_are_refused_before_anything_starts(case, extra, message, lms, tmp_path, capsys):
    kind = case.split("_")[0]
    config, *args = job_args(kind, "mdm_grpo", lms)
    if kind == "llada2":
        args = [a for a in args if not a.startswith("algo.estimator")]
    argv = ["--config", config, f"run.root={tmp_path}", f"run.name={case}", *COMMON, *args, *extra]
    assert train_rl.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / case).exists()


def test_a_model_without_a_mask_token_names_the_key(lms, tmp_path, capsys):
    import shutil

    folder = tmp_path / "no_mask"
    shutil.copytree(lms["llada"], folder)  # LLaDA names its mask only in config.json: drop it
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["mask_token_id"]
    (folder / "config.json").write_text(json.dumps(cfg))
    config, *args = job_args("llada", "mdm_grpo", lms)
    argv = ["--config", config, f"run.root={tmp_path}", "run.name=nomask", *COMMON, *args, f"policy.checkpoint={folder}"]
    assert train_rl.main(argv) == 2
    assert "no mask token" in capsys.readouterr().err and not (tmp_path / "nomask").exists()
    from rlgen.config import load_config
    from rlgen.runtime.trainer import Trainer

    cfg = load_config(config, [f"run.root={tmp_path}", "run.name=nomask", *COMMON, *args, f"policy.checkpoint={folder}",
                               "policy.mask_token_id=1"])
    assert Trainer(cfg)._check()[0] == folder  # the key is what the check asked for; nothing started


def test_a_hub_id_is_checked_like_a_folder(lms, tmp_path, monkeypatch, capsys):
    """policy.checkpoint=owner/name of a remote-code LM in the local Hugging Face cache: the same start-up
    checks as for its folder (remote code needs the flag) run on the cached snapshot, before anything starts."""
    from tests_helpers import offline_hub_cache

    from rlgen.config import load_config
    from rlgen.runtime.trainer import Trainer

    offline_hub_cache(monkeypatch, tmp_path / "hub", "acme/tiny-llada", lms["llada"])
    config, *args = job_args("llada", "mdm_grpo", lms)
    over = [f"run.root={tmp_path}", "run.name=hub", *COMMON, *args, "policy.checkpoint=acme/tiny-llada"]
    assert str(Trainer(load_config(config, over))._check()[0]) == "acme/tiny-llada"
    assert train_rl.main(["--config", config, *over, "policy.trust_remote_code=false"]) == 2
    err = capsys.readouterr().err
    assert "policy.trust_remote_code=true" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "hub_run").exists() and not (tmp_path / "hub").joinpath("config.yaml").exists()
