"""configs/real/ image-pipeline recipes (the text ones: tests/runtime/test_lms_config.py): the GPU-cluster
recipes parse, resolve and pass the job's own set-up checks (no weights needed); each header shows how to launch it.
A smoke run of one on the tiny SD3 pipeline is in
tests/runtime/test_pipelines_e2e.py (slow)."""
from pathlib import Path

import pytest
import yaml

import train_rl
from rlgen.config import load_config

REAL = sorted(p for p in (Path(__file__).resolve().parents[1] / "configs" / "real").glob("*.yaml")
              if "sd35m" in p.stem or "flux" in p.stem)


def test_there_are_the_five_published_recipes():
    assert {p.stem for p in REAL} >= {"flow_grpo_sd35m_pickscore", "flow_grpo_sd35m_ocr",
                                      "flow_grpo_flux1dev_pickscore", "diffusion_dpo_sd35m", "flow_opd_sd35m"}


@pytest.mark.parametrize("path", REAL, ids=[p.stem for p in REAL])
def test_print_config(path, capsys):
    assert train_rl.main(["--config", str(path), "--print-config"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["ray"]["address"] == "auto" and cfg["policy"]["dtype"] == "bfloat16"
    assert cfg["policy"]["lora"]["rank"] == 32 and cfg["policy"]["lora"]["alpha"] == 64
    assert cfg["policy"]["options"]["resolution"] == 512
    header = path.read_text().split("\nrun:")[0]
    assert "ray job submit" in header and f"--config configs/real/{path.name}" in header
    assert "Memory (ESTIMATES" in header
    if cfg["algo"]["name"] != "diffusion_dpo":
        assert cfg["rollout"]["shift"] == 0  # the pipeline's own sigma schedule, not rlgen's pixel default


@pytest.mark.parametrize("path", REAL, ids=[p.stem for p in REAL])
def test_batches_split_over_the_learners(path):
    """Each step's samples split into the configured ranks, updates and micro-batches (the job's check)."""
    from rlgen.algos.base import get_algorithm

    cfg = load_config(str(path))
    get_algorithm(cfg.algo.name)(cfg.algo).check_job(cfg)  # raises on a split that does not divide
    if cfg.algo.name == "diffusion_dpo":
        assert cfg.pairs.per_step % (cfg.learner.num_learners * cfg.learner.micro_batch_size) == 0


def test_kl_is_flow_grpos_beta_times_the_mean_step():
    """rlgen's kl_beta is the exact step KL's weight; Flow-GRPO's code KL is that times |dt| (header)."""
    for name, beta in (("flow_grpo_sd35m_pickscore", 0.01), ("flow_grpo_sd35m_ocr", 0.04),
                       ("flow_grpo_flux1dev_pickscore", 0.0)):
        cfg = load_config(f"configs/real/{name}.yaml")
        assert cfg.algo.kl_beta == pytest.approx(beta / cfg.rollout.num_steps)
