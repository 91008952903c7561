"""The job config's vocabulary for Hugging Face diffusion LMs: typed model conventions (``policy.lm``),
text datasets as a prompt source (``prompts.source: dataset``), ``policy.dtype`` reaching every load,
and the GPU recipes in configs/real/ parsing as they are."""
import json

import pytest
import torch

import train_rl
from rlgen.config import ConfigError, load_config

ROWS = [{"question": f"q{i}?", "answer": str(i), "level": "easy"} for i in range(5)]
REAL = ["configs/real/d1_llada8b_gsm8k.yaml", "configs/real/vrpo_llada8b.yaml", "configs/real/grpo_llada2_mini.yaml"]


def job(*overrides):
    return load_config("configs/rl/mdm_grpo_arith.yaml", list(overrides))


def test_conventions_are_typed_fields_that_reach_load_options():
    cfg = job("policy.lm.attention=block_causal", "policy.lm.block_size=8", "policy.trust_remote_code=true",
              "policy.mask_token_id=5", "policy.dtype=bfloat16")
    assert cfg.policy.load_options() == {"attention": "block_causal", "block_size": 8, "trust_remote_code": True,
                                         "mask_token_id": 5, "dtype": "bfloat16", "float32_on_cpu": True}
    assert job().policy.load_options() == {}  # nothing set: every convention detected from the folder
    with pytest.raises(ConfigError, match=r"unknown key 'policy.lm.shift'.*valid keys: attention, "
                                          r"attention_mask_format, block_size, shift_logits"):
        job("policy.lm.shift=true")
    with pytest.raises(ConfigError, match=r"override 'policy.lm.attention=causal': key 'policy.lm.attention' must "
                                          r"be one of \['bidirectional', 'block_causal'\]"):
        job("policy.lm.attention=causal")
    with pytest.raises(ConfigError, match=r"key 'policy.lm.block_size' must be > 0"):
        job("policy.lm.block_size=0")


def test_dataset_source_needs_its_section_and_names_bad_keys(tmp_path):
    for bad in (["prompts.source=dataset"], ["prompts.source=dataset", "prompts.dataset={prompt_column: q}"]):
        with pytest.raises(ConfigError, match=r"key 'prompts.dataset.path' is required when prompts.source=dataset"):
            job(*bad)
    with pytest.raises(ConfigError, match=r"key 'prompts.source' must be 'dataset' when prompts.dataset.path is set, "
                                          r"got 'arith'"):
        job("prompts.dataset.path=x.jsonl")
    with pytest.raises(ConfigError, match=r"unknown key 'prompts.dataset.colums'"):
        job("prompts.source=dataset", "prompts.dataset={path: x.jsonl, colums: [a]}")
    with pytest.raises(ConfigError, match=r"key 'prompts.dataset.gen_length' must be > 0"):
        job("prompts.source=dataset", "prompts.dataset={path: x.jsonl, gen_length: 0}")


def test_dataset_items_carry_prompt_width_columns_and_unrendered_chat(tmp_path):
    from rlgen.runtime.sources import PromptSource

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    cfg = job("prompts.source=dataset", f"prompts.dataset={{path: {data}, prompt_column: question, gen_length: 12, "
              f"chat_template: true, system_prompt: Be brief.}}", "prompts.per_step=2")
    src = PromptSource(cfg.prompts, seed=3, modality="text")
    items = src.sample(1)
    assert len(items) == 2 and set(items[0]) == {"prompt", "gen_length", "answer", "level", "messages"}
    row = ROWS[int(items[0]["answer"])]
    assert items[0]["prompt"] == row["question"] and items[0]["gen_length"] == 12
    assert items[0]["messages"] == [{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": row["question"]}]
    # steps 1-5 hold 10 items = two epochs: every row twice, and a pure function of (seed, step)
    seen = [it["answer"] for s in range(1, 6) for it in src.sample(s)]
    assert sorted(seen) == sorted([str(i) for i in range(5)] * 2) and sorted(seen[:5]) == [str(i) for i in range(5)]
    again = PromptSource(cfg.prompts, seed=3, modality="text")
    assert [it["answer"] for it in again.sample(4)] == [it["answer"] for it in src.sample(4)]


def test_job_dtype_is_float32_on_cpu_but_a_direct_request_is_obeyed(tmp_path, capsys):
    from rlgen.models import compute_dtype, load_model
    from rlgen.testing.tiny_lms import build_tiny_llada2

    assert compute_dtype("bfloat16", "cuda:0", float32_on_cpu=True) == torch.bfloat16
    assert compute_dtype("bfloat16", "cpu", float32_on_cpu=True) is None
    assert "policy.dtype=bfloat16 applies on GPUs only" in capsys.readouterr().out
    path = build_tiny_llada2(tmp_path / "m")
    opts = job("policy.dtype=bfloat16", "policy.trust_remote_code=true").policy.load_options()
    assert load_model(path, device="cpu", **opts).dtype == torch.float32  # what a CPU worker of the job holds
    assert load_model(path, trust_remote_code=True, dtype="bfloat16").dtype == torch.bfloat16


@pytest.mark.parametrize("path", REAL)
def test_real_model_recipes_parse_and_say_their_memory(path, capsys):
    assert train_rl.main(["--config", path, "--print-config"]) == 0
    assert "policy:" in capsys.readouterr().out
    header = [ln for ln in open(path).read().splitlines() if ln.startswith("#")]
    assert any("python train_rl.py --config " + path in ln for ln in header)
    assert any("Memory (ESTIMATE, not measured)" in ln for ln in header)
    cfg = load_config(path)
    assert cfg.policy.trust_remote_code and cfg.policy.dtype == "bfloat16" and cfg.policy.gradient_checkpointing
    if cfg.algo.name == "mdm_grpo":
        assert cfg.prompts.source == "dataset" and cfg.prompts.dataset.chat_template
        assert cfg.rewards == {"math_answer": 1.0} and cfg.policy.lora.rank > 0
    expected = {"d1_llada8b_gsm8k": ("mdm_grpo", "d1"), "grpo_llada2_mini": ("mdm_grpo", "trajectory"),
                "vrpo_llada8b": ("vrpo", None)}[cfg.run.name]
    assert (cfg.algo.name, getattr(cfg.algo, "estimator", None)) == expected
