from dataclasses import dataclass, field

import pytest

from rlgen.config import ConfigError, RunConfig, from_dict, load_config, parse_override, register_config


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
