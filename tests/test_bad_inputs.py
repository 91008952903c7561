"""Bad inputs are refused with one clear error, and nothing on disk changes (issue #8, item 3).

Each case builds a bad input under ``tmp_path`` (beside an existing run folder, ``runs/existing``,
with a complete checkpoint and metrics), calls the real entry point — ``train_rl.main``,
``python -m rlgen.evaluate``'s ``main``, ``load_config``, ``load_model``, ``load_problems``,
``load_pairs``, ``RewardMixer``, ``PromptSource``, ``LearnerGroup`` — and checks

  * the error's type and that its message names the file, row or key at fault;
  * every file under ``tmp_path`` (the run folder, its checkpoints, the bad input itself) is
    unchanged: same set of files, sizes and mtimes.

The table is ``CASES``: name → builder(tmp) returning (call, exception type, message regex). A CLI
that exits non-zero is turned into ``CLIError(stderr)`` so every case reads the same way.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ARITH = REPO / "rlgen" / "assets" / "mdm_arith_base"
FLOW = REPO / "rlgen" / "assets" / "flow_shapes_base"

pytestmark = pytest.mark.usefixtures("one_thread")


class CLIError(Exception):
    """A CLI ``main`` returned non-zero; the message is what it printed to stderr."""


def cli(main, argv: list[str]):
    def call():
        import contextlib
        import io

        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                rc = main(argv)
            except SystemExit as e:  # argparse
                rc = e.code
        if rc != 0:
            raise CLIError(f"rc={rc}: {err.getvalue()}")
    return call


def train_rl(argv):
    import train_rl as t

    return cli(t.main, argv)


def evaluate(argv):
    from rlgen.evaluate import main

    return cli(main, [*argv, "--no-progress", "--device", "cpu"])


# ----------------------------------------------------------------------------------------------
# the existing run folder every case must leave alone
# ----------------------------------------------------------------------------------------------
def make_existing_run(tmp: Path) -> Path:
    run = tmp / "runs" / "existing"
    ckpt = run / "checkpoints" / "1"
    shutil.copytree(ARITH, ckpt)
    (ckpt / "COMPLETE").write_text('{"step": 1}')
    os.symlink("1", run / "checkpoints" / "latest")
    (run / "config.yaml").write_text("kind: mdm_grpo\n")
    (run / "metrics.jsonl").write_text('{"step": 0, "reward_mean": 0.1}\n{"step": 1, "reward_mean": 0.2}\n')
    return run


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            out[os.path.relpath(p, root)] = (st.st_mtime_ns, st.st_size)
    return out


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def rl_yaml(tmp: Path, body: str) -> Path:
    """An RL config pointed at the existing run (same root and name)."""
    return write(tmp / "bad.yaml", f"run: {{root: {tmp / 'runs'}, name: existing}}\n{body}")


def arith_copy(tmp: Path, name: str) -> Path:
    d = tmp / name
    shutil.copytree(ARITH, d)
    return d


# ----------------------------------------------------------------------------------------------
# cases
# ----------------------------------------------------------------------------------------------
CASES = {}


def case(fn):
    CASES[fn.__name__] = fn
    return fn


# configs: train_rl.main refuses before any folder is touched
@case
def config_unknown_key(tmp):
    cfg = rl_yaml(tmp, "algo: {name: flow_grpo}\n")
    return train_rl(["--config", str(cfg), "train.stesp=3"]), CLIError, r"unknown key 'train\.stesp'"


@case
def config_unknown_key_in_file(tmp):
    cfg = rl_yaml(tmp, "algo: {name: flow_grpo, clip_rnage: 0.1}\n")
    return train_rl(["--config", str(cfg)]), CLIError, rf"{cfg}: unknown key 'algo\.clip_rnage'"


@case
def config_wrong_type(tmp):
    cfg = rl_yaml(tmp, "algo: {name: flow_grpo}\ntrain: {steps: many}\n")
    return train_rl(["--config", str(cfg)]), CLIError, rf"{cfg}: key 'train\.steps' must be an integer"


@case
def config_wrong_type_override(tmp):
    cfg = rl_yaml(tmp, "algo: {name: flow_grpo}\n")
    return (train_rl(["--config", str(cfg), "run.tensorboard=maybe"]), CLIError,
            r"key 'run\.tensorboard' must be true or false")


@case
def config_bad_yaml(tmp):
    cfg = write(tmp / "bad.yaml", "algo: {name: flow_grpo}\nrun: {name: existing\n")
    return train_rl(["--config", str(cfg)]), CLIError, rf"{cfg}: invalid YAML"


@case
def config_unknown_kind(tmp):
    cfg = rl_yaml(tmp, "kind: flow_gpro\n")
    return train_rl(["--config", str(cfg)]), CLIError, rf"{cfg}: unknown kind 'flow_gpro'"


@case
def config_pretrain_kind_given_to_train_rl(tmp):
    cfg = write(tmp / "bad.yaml", f"kind: flow_pretrain\nrun: {{root: {tmp / 'runs'}, name: existing}}\n")
    return train_rl(["--config", str(cfg)]), CLIError, r"kind 'flow_pretrain' is a pretraining job"


@case
def config_missing_file(tmp):
    return train_rl(["--config", str(tmp / "nope.yaml")]), CLIError, rf"config file not found: {tmp / 'nope.yaml'}"


@case
def config_bad_reward_weight(tmp):
    from rlgen.config import ConfigError, load_config

    cfg = rl_yaml(tmp, "algo: {name: flow_grpo}\nrewards: {shapes_verifier: lots}\n")
    return lambda: load_config(cfg), ConfigError, r"key 'rewards\.shapes_verifier' must be a number"


# checkpoints
@case
def checkpoint_missing_dir(tmp):
    return (evaluate(["--checkpoint", str(tmp / "runs" / "nope"), "--benchmark", "arith"]), CLIError,
            rf"checkpoint not found: {tmp / 'runs' / 'nope'}")


@case
def checkpoint_run_without_complete_checkpoint(tmp):
    run = tmp / "runs" / "half"
    (run / "checkpoints" / ".tmp-5-123").mkdir(parents=True)  # a crash mid-save leaves only a temp dir
    return (evaluate(["--checkpoint", str(run), "--benchmark", "arith"]), CLIError,
            rf"run folder {run} has no complete checkpoint")


@case
def checkpoint_truncated_safetensors(tmp):
    from rlgen.models import ModelLoadError, load_model

    d = arith_copy(tmp, "trunc")
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    return lambda: load_model(d), ModelLoadError, rf"{d}: cannot load masked_lm model: SafetensorError"


@case
def checkpoint_corrupt_safetensors(tmp):
    d = arith_copy(tmp, "garbage")
    (d / "model.safetensors").write_bytes(b"\x00" * 64)
    return (evaluate(["--checkpoint", str(d), "--benchmark", "arith"]), CLIError,
            rf"{d}: cannot load masked_lm model: SafetensorError")


@case
def checkpoint_flow_truncated_unet(tmp):
    from rlgen.models import ModelLoadError, load_model

    d = tmp / "flow"
    shutil.copytree(FLOW, d)
    w = d / "unet" / "diffusion_pytorch_model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    return lambda: load_model(d), ModelLoadError, rf"{d / 'unet'}: cannot load unet"


@case
def checkpoint_meta_missing(tmp):
    from rlgen.models import ModelLoadError, load_model

    d = arith_copy(tmp, "nometa")
    (d / "rlgen_model.json").unlink()  # without config.json either, it is no Hugging Face folder
    (d / "config.json").unlink()
    return lambda: load_model(d), ModelLoadError, rf"{d}: neither an rlgen checkpoint \(rlgen_model\.json\), a diffusers pipeline folder"


@case
def checkpoint_meta_corrupt_json(tmp):
    from rlgen.models import ModelLoadError, load_model

    d = arith_copy(tmp, "badmeta")
    (d / "rlgen_model.json").write_text('{"model_type": "masked_lm",')
    return lambda: load_model(d), ModelLoadError, rf"{d / 'rlgen_model.json'}: corrupt JSON"


@case
def checkpoint_meta_unknown_model_type(tmp):
    from rlgen.models import ModelLoadError, load_model

    d = arith_copy(tmp, "unknowntype")
    meta = json.loads((d / "rlgen_model.json").read_text())
    (d / "rlgen_model.json").write_text(json.dumps({**meta, "model_type": "gpt9"}))
    return lambda: load_model(d), ModelLoadError, rf"{d / 'rlgen_model.json'}: model_type 'gpt9': unknown model"


@case
def checkpoint_meta_wrong_model_type(tmp):
    from rlgen.models import ModelLoadError, load_model

    d = arith_copy(tmp, "wrongtype")  # a masked LM folder that claims to be a flow policy
    meta = json.loads((d / "rlgen_model.json").read_text())
    (d / "rlgen_model.json").write_text(json.dumps({**meta, "model_type": "flow_policy"}))
    return lambda: load_model(d), ModelLoadError, rf"{d}: missing 'unet/' folder of a flow_policy model"


@case
def checkpoint_text_model_for_image_benchmark(tmp):
    run = tmp / "runs" / "existing"  # holds the arith masked LM
    return (evaluate(["--checkpoint", str(run), "--benchmark", "shapes"]), CLIError,
            r"the shapes benchmark scores flow image models; this checkpoint holds a MaskedDiffusionLM")


@case
def checkpoint_image_model_for_text_benchmark(tmp):
    return (evaluate(["--checkpoint", str(FLOW), "--benchmark", "countdown", "--set", "n_per_level=1"]), CLIError,
            r"the countdown benchmark scores masked-diffusion text models; this checkpoint holds a FlowPolicy")


# tokenizers
@case
def tokenizer_missing_files(tmp):
    from rlgen.models import ModelLoadError, load_model

    d = arith_copy(tmp, "notok")
    (d / "tokenizer.json").unlink()
    (d / "tokenizer_config.json").unlink()
    return lambda: load_model(d), ModelLoadError, rf"{d}: no tokenizer\.json / tokenizer_config\.json"


@case
def tokenizer_vocab_larger_than_model(tmp):
    from rlgen.data.tokenizer import CHARSET, build_tokenizer
    from rlgen.models import ModelLoadError, load_model

    d = arith_copy(tmp, "mismatch")  # model/tokenizer mismatch: a tokenizer from another model
    build_tokenizer(CHARSET + "ABCDEFGHIJ").save_pretrained(str(d))
    return lambda: load_model(d), ModelLoadError, r"tokenizer has 67 tokens but the model's output layer only 57"


@case
def tokenizer_text_outside_vocab(tmp):
    from rlgen.data.tokenizer import encode, load_tokenizer

    tok = load_tokenizer(ARITH)
    return lambda: encode(tok, "12€3"), ValueError, r"text '12€3' has characters outside the tokenizer vocabulary: \['€'\]"


# problem files (text benchmarks); the run folder is the one evaluated, --out inside it
def _eval_problems(tmp, lines: str, benchmark="arith"):
    probs = write(tmp / "problems.jsonl", lines)
    run = tmp / "runs" / "existing"
    return probs, evaluate(["--checkpoint", str(run), "--benchmark", benchmark, "--problems", str(probs),
                            "--out", str(run / "eval.json")])


@case
def problems_malformed_jsonl_line(tmp):
    probs, call = _eval_problems(tmp, '{"task": "arith", "expression": "047+085"}\n{"task": "arith", "expr\n')
    return call, CLIError, rf"{probs}:2: invalid JSON"


@case
def problems_unknown_task(tmp):
    probs, call = _eval_problems(tmp, '{"task": "arith", "expression": "047+085"}\n{"task": "chess", "fen": "8/8"}\n')
    return call, CLIError, rf"{probs}:2: unknown task 'chess'"


@case
def problems_wrong_field_type(tmp):
    probs, call = _eval_problems(tmp, '{"task": "countdown", "numbers": "3 7 9", "target": 30}\n', "countdown")
    return call, CLIError, rf"{probs}:1: field 'numbers' must be a list"


@case
def problems_other_task_than_benchmark(tmp):
    probs, call = _eval_problems(tmp, '{"task": "countdown", "numbers": [3, 7, 9], "target": 30}\n')
    return call, CLIError, rf"{probs}: problem 1 is a 'countdown' problem; the arith benchmark"


@case
def problems_empty_file(tmp):
    from rlgen.data.text_tasks import ProblemError, load_problems

    probs = write(tmp / "problems.jsonl", "\n\n")
    return lambda: load_problems(probs), ProblemError, rf"{probs}: no problems"


# prompt files
@case
def prompts_empty_file(tmp):
    prompts = write(tmp / "prompts.txt", "# only a comment\n\n")
    return (evaluate(["--checkpoint", str(tmp / "runs" / "existing"), "--benchmark", "shapes",
                      "--prompts", str(prompts)]), CLIError, rf"{prompts}: no prompts")


@case
def prompts_outside_shapes_grammar(tmp):
    prompts = write(tmp / "prompts.txt", "a red circle\na photo of a cat\n")
    return (evaluate(["--checkpoint", str(tmp / "runs" / "existing"), "--benchmark", "shapes",
                      "--prompts", str(prompts)]), CLIError, rf"{prompts}:2: .*'a photo of a cat'")


@case
def prompts_rl_file_empty(tmp):
    from rlgen.runtime.job import PromptsConfig
    from rlgen.runtime.sources import PromptSource

    prompts = write(tmp / "prompts.txt", "\n# nothing\n")
    return (lambda: PromptSource(PromptsConfig(source="file", file=str(prompts)), 0, "image"), ValueError,
            rf"{prompts}: no prompts")


@case
def prompts_rl_unknown_task_type(tmp):
    from rlgen.runtime.job import PromptsConfig
    from rlgen.runtime.sources import PromptSource

    return (lambda: PromptSource(PromptsConfig(tasks=["counting", "colours"]), 0, "image"), ValueError,
            r"prompts\.tasks: unknown shapes task types \['colours'\]")


# reward outputs, through the mixer the RewardWorker runs
def _mixer(name: str):
    from rewards.base import RewardMixer

    mixer = RewardMixer({"rewards": {name: 1.0}})
    return lambda: mixer(["a", "b", "c"], ["p0", "p1", "p2"])


def _register_bad_rewards():
    from rlgen.registry import REWARDS, register_reward

    if "_bi_nan" in REWARDS.names():
        return
    register_reward("_bi_nan")(lambda samples, prompts: [1.0, float("nan"), 0.0])
    register_reward("_bi_short")(lambda samples, prompts: [1.0])
    register_reward("_bi_raises")(lambda samples, prompts: {}["score"])
    register_reward("_bi_text")(lambda samples, prompts: [1.0, "high", 0.0])
    register_reward("_bi_shape")(lambda samples, prompts: __import__("torch").zeros(3, 2))


@case
def reward_nan(tmp):
    from rewards.base import RewardError

    _register_bad_rewards()
    return _mixer("_bi_nan"), RewardError, r"reward '_bi_nan' returned nan for sample 1 \(prompt 'p1'\)"


@case
def reward_wrong_length(tmp):
    from rewards.base import RewardError

    _register_bad_rewards()
    return _mixer("_bi_short"), RewardError, r"reward '_bi_short' returned 1 scores for 3 samples"


@case
def reward_wrong_shape(tmp):
    from rewards.base import RewardError

    _register_bad_rewards()
    return _mixer("_bi_shape"), RewardError, r"reward '_bi_shape' returned a tensor of shape \(3, 2\); expected \(3,\)"


@case
def reward_raises(tmp):
    from rewards.base import RewardError

    _register_bad_rewards()
    return _mixer("_bi_raises"), RewardError, r"reward '_bi_raises' failed on a batch of 3 .*'p0'.*KeyError"


@case
def reward_non_numeric(tmp):
    from rewards.base import RewardError

    _register_bad_rewards()
    return _mixer("_bi_text"), RewardError, r"reward '_bi_text' returned str 'high' for sample 1 \(prompt 'p1'\)"


@case
def reward_unknown_name(tmp):
    from rlgen.registry import RegistryError

    return _mixer_lazy("no_such_reward"), RegistryError, r"unknown reward 'no_such_reward'"


def _mixer_lazy(name):
    return lambda: _mixer(name)()


# images
@case
def image_wrong_channels_for_verifier(tmp):
    import torch
    from rewards.base import RewardError, RewardMixer

    mixer = RewardMixer({"rewards": {"shapes_verifier": 1.0}})
    gray = torch.zeros(2, 1, 64, 64)  # (B, 1, H, W): a grayscale model's output given to an RGB verifier
    return (lambda: mixer(gray, ["a red circle", "a blue square"]), RewardError,
            r"reward 'shapes_verifier' failed .*'a red circle'.*expected a uint8 \(H, W, 3\).*shape \(1, 64, 64\)")


@case
def image_wrong_size_in_pairs(tmp):
    import torch
    from rlgen.data.pairs import PairFormatError, load_pairs, write_image

    write_image(torch.zeros(3, 32, 32), tmp / "pairs" / "a.png")
    write_image(torch.zeros(3, 16, 16), tmp / "pairs" / "b.png")
    f = write(tmp / "pairs" / "pairs.jsonl", '{"prompt": "a red circle", "chosen": "a.png", "rejected": "b.png"}\n')
    return (lambda: load_pairs(f, image_size=32), PairFormatError,
            rf"{f}: row 1: rejected image 'b.png' is 16×16, expected 32×32")


@case
def image_unreadable_in_pairs(tmp):
    from rlgen.data.pairs import PairFormatError, load_pairs

    write(tmp / "pairs" / "a.png", "not a png")
    write(tmp / "pairs" / "b.png", "not a png")
    f = write(tmp / "pairs" / "pairs.jsonl", '{"prompt": "a red circle", "chosen": "a.png", "rejected": "b.png"}\n')
    return lambda: load_pairs(f), PairFormatError, rf"{f}: row 1: cannot read chosen image 'a.png'"


# pair files
@case
def pairs_malformed_row(tmp):
    from rlgen.data.pairs import PairFormatError, load_pairs

    f = write(tmp / "pairs.jsonl", '{"prompt": "1+1=", "chosen": "2", "rejected": "3"}\n{"prompt": "2+2=", "chosen"\n')
    return lambda: load_pairs(f), PairFormatError, rf"{f}: row 2: invalid JSON"


@case
def pairs_missing_field(tmp):
    from rlgen.data.pairs import PairFormatError, load_pairs

    f = write(tmp / "pairs.jsonl", '{"prompt": "1+1=", "chosen": "2"}\n')
    return lambda: load_pairs(f), PairFormatError, rf"{f}: row 1: missing field 'rejected'"


# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_clear_error_and_touches_nothing(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a default runs/ folder would land here, and be caught below
    make_existing_run(tmp_path)
    call, exc, match = CASES[name](tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(exc, match=match) as info:
        call()
    if exc is CLIError:  # one message, not a traceback
        assert "Traceback" not in str(info.value), str(info.value)
    assert snapshot(tmp_path) == before, f"{name} changed files under {tmp_path}"


def test_the_suite_covers_every_kind_of_input():
    kinds = {n.split("_")[0] for n in CASES}
    assert {"config", "checkpoint", "tokenizer", "problems", "prompts", "reward", "image", "pairs"} <= kinds
    assert len(CASES) >= 20

