from dataclasses import dataclass, field

import pytest

from rlgen.config import ConfigError, from_dict, load_config, parse_override, register_config
from rlgen.runtime.rundir import RunConfig


@dataclass
class Optim:
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    schedule: str = "cosine"


@dataclass
class ToyJob:
    kind: str = "toy_job"
    run: RunConfig = field(default_factory=RunConfig)
    optim: Optim = field(default_factory=Optim)
    steps: int = 10
    use_ema: bool = True
    weights: dict[str, float] = field(default_factory=dict)
    note: str | None = None


register_config("toy_job")(ToyJob)


def write(tmp_path, text):
    p = tmp_path / "job.yaml"
    p.write_text(text)
    return p


def test_yaml_and_overrides_set_typed_fields(tmp_path):
    p = write(tmp_path, "kind: toy_job\nsteps: 5\noptim:\n  lr: 3e-4\nweights: {a: 1, b: 0.5}\n")
    cfg = load_config(p, ["optim.schedule=linear", "run.name=abc", "use_ema=false", "steps=7"])
    assert isinstance(cfg, ToyJob)
    assert cfg.steps == 7 and cfg.use_ema is False
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)  # "3e-4" is a YAML string
    assert cfg.optim.schedule == "linear" and cfg.optim.betas == [0.9, 0.999]  # untouched default survives
    assert cfg.weights == {"a": 1.0, "b": 0.5}
    assert cfg.run.name == "abc" and str(cfg.run.dir).endswith("runs/abc")


def test_unknown_key_names_key_and_file(tmp_path):
    p = write(tmp_path, "kind: toy_job\noptim:\n  learning_rate: 1.0\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "optim.learning_rate" in str(e.value) and str(p) in str(e.value)


def test_unknown_override_key_is_an_error(tmp_path):
    p = write(tmp_path, "kind: toy_job\n")
    with pytest.raises(ConfigError, match="run.nmae"):
        load_config(p, ["run.nmae=x"])


@pytest.mark.parametrize("override,needle", [("steps=ten", "steps"), ("use_ema=3", "use_ema"),
                                             ("optim.lr=fast", "optim.lr"), ("optim=3", "optim"),
                                             ("note=[1, 2]", "note")])
def test_mistyped_values_are_errors(tmp_path, override, needle):
    p = write(tmp_path, "kind: toy_job\n")
    with pytest.raises(ConfigError, match=needle):
        load_config(p, [override])


def test_flow_map_without_space_gets_a_hint(tmp_path):
    # 'weights={a:1.0}' is YAML for the key "a:1.0" with no value: say what was meant
    p = write(tmp_path, "kind: toy_job\n")
    with pytest.raises(ConfigError, match=r"weights\.a:1\.0.*space after the colon"):
        load_config(p, ["weights={a:1.0}"])
    assert load_config(p, ["weights={a: 1.0}"]).weights == {"a": 1.0}


def test_malformed_inputs(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("steps")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(write(tmp_path, "kind: [toy\n"))
    with pytest.raises(ConfigError, match="unknown kind 'nope'"):
        load_config(write(tmp_path, "kind: nope\n"))
    with pytest.raises(ConfigError, match="missing 'kind'"):
        load_config(write(tmp_path, "steps: 3\n"))


def test_from_dict_roundtrip():
    cfg = from_dict(ToyJob, {"steps": 3, "optim": {"betas": [0.5, 0.6]}})
    assert cfg.optim.betas == [0.5, 0.6] and cfg.run.seed == 0


def test_yes_no_stay_strings_true_false_are_booleans(tmp_path):
    p = write(tmp_path, "kind: toy_job\nrun:\n  resume: no\nuse_ema: false\n")
    cfg = load_config(p, ["note=off"])
    assert cfg.run.resume == "no" and cfg.use_ema is False and cfg.note == "off"


@pytest.mark.parametrize("name", ["../x", "a/b", "/tmp/x", "..", ".", "", "a\\b"])
def test_run_name_must_be_a_plain_folder_name(tmp_path, name):
    p = write(tmp_path, "kind: toy_job\nrun: {root: " + str(tmp_path / "runs") + "}\n")
    with pytest.raises(ConfigError, match=rf"^override 'run.name=.*': key 'run.name' must be a plain folder name"):
        load_config(p, [f"run.name={name}"])
    assert not (tmp_path / "runs").exists() and not (tmp_path / "x").exists()


def test_run_name_with_control_characters_is_refused():
    with pytest.raises(ValueError, match="name: must be a plain folder name .*'x\\\\ny'"):
        RunConfig(name="x\ny")


def test_plain_run_names_are_accepted(tmp_path):
    p = write(tmp_path, "kind: toy_job\n")
    for name in ("quickstart", "my-run_2.v3", "run 1"):
        assert load_config(p, [f"run.name={name}"]).run.dir.name == name


# ----------------------------------------------------------------------------------------------
# composition and attribution (the train_rl.py job config)
# ----------------------------------------------------------------------------------------------
def test_base_config_is_loaded_first_and_a_variant_changes_a_few_keys(tmp_path):
    (tmp_path / "base.yaml").write_text("kind: toy_job\nsteps: 5\noptim: {lr: 0.1, schedule: linear}\n"
                                        "weights: {a: 1.0}\n")
    variant = tmp_path / "sub" / "variant.yaml"
    variant.parent.mkdir()
    variant.write_text("base: ../base.yaml\noptim: {lr: 0.2}\n")
    cfg = load_config(variant)
    assert cfg.steps == 5 and cfg.optim.lr == 0.2 and cfg.optim.schedule == "linear"  # merged key by key
    with pytest.raises(ConfigError) as e:  # an error names the file that set the key
        load_config(variant, ["optim.lr=fast"])
    assert "override 'optim.lr=fast'" in str(e.value) and str(variant) not in str(e.value)
    (tmp_path / "bad.yaml").write_text("base: base.yaml\noptim: {lr: oops}\n")
    with pytest.raises(ConfigError, match=rf"^{tmp_path / 'bad.yaml'}: key 'optim.lr'"):
        load_config(tmp_path / "bad.yaml")


def test_base_cycles_and_missing_bases_are_errors(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: nope.yaml\nkind: toy_job\n")
    with pytest.raises(ConfigError, match="base config not found"):
        load_config(tmp_path / "c.yaml")


def test_the_fashion_variants_are_short_and_differ_from_their_base_only_where_they_say():
    from rlgen.config import to_dict

    base = to_dict(load_config("configs/rl/flow_grpo_fashion_kl.yaml"))
    nokl = to_dict(load_config("configs/rl/flow_grpo_fashion_nokl.yaml"))
    clip = to_dict(load_config("configs/rl/flow_grpo_fashion_clip.yaml"))
    assert nokl["algo"]["kl_beta"] == 0.0 and base["algo"]["kl_beta"] == 0.04
    assert {k for k in base if base[k] != nokl[k]} == {"run", "algo"}
    assert {k for k in base if base[k] != clip[k]} == {"run", "rewards", "reward_kwargs"}
    assert clip["rewards"] == {"fashion_classifier": 1.0, "clip_score": 1.0}


def test_algo_name_picks_the_algorithm_config_and_the_rollout_type(tmp_path):
    from rlgen.algos.mdm_grpo import MDMGRPOConfig
    from rlgen.families.masked_lm import TextRolloutConfig

    p = tmp_path / "j.yaml"
    p.write_text("algo: {name: mdm_grpo, estimator: coupled}\npolicy: {checkpoint: x}\nrewards: {a: 1.0}\n"
                 "rollout: {temperature: 0.5}\n")
    cfg = load_config(p)
    assert isinstance(cfg.algo, MDMGRPOConfig) and cfg.algo.estimator == "coupled"
    assert isinstance(cfg.rollout, TextRolloutConfig) and cfg.rollout.temperature == 0.5
    with pytest.raises(ConfigError, match=r"unknown key 'rollout\.num_steps' for TextRolloutConfig"):
        load_config(p, ["rollout.num_steps=3"])
    with pytest.raises(ConfigError, match=r"unknown algorithm 'nope'"):
        load_config(p, ["algo.name=nope"])


@pytest.mark.parametrize("override,needle", [
    ("prompts.per_step=0", "key 'prompts.per_step' must be >= 1"),
    ("prompts.group_size=1", "key 'prompts.group_size' must be >= 2"),
    ("rollout.noise_level=-1", "key 'rollout.noise_level' must be > 0"),
    ("rollout.noise_level=.nan", "key 'rollout.noise_level' must be a finite number"),
    ("optim.lr=.nan", "key 'optim.lr' must be a finite number"),
    ("train.save_every=-1", "key 'train.save_every' must be >= 0"),
    ("learner.zero_stage=4", "key 'learner.zero_stage' must be one of"),
])
def test_ranges_are_checked_and_attributed_to_the_override(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config("configs/quickstart.yaml", [override])
    assert needle in str(e.value) and f"override '{override}'" in str(e.value), str(e.value)
