"""Bad inputs are refused with one clear error, and nothing on disk changes (issues #8 and #20).

Each case builds a bad input under ``tmp_path`` (beside an existing run folder, ``runs/existing``,
with a complete checkpoint and metrics), calls the real entry point — ``train_rl.main``,
``python -m rlgen.evaluate``'s ``main``, ``load_config``, ``load_model``, ``load_problems``,
``load_pairs``, ``RewardMixer``, ``PromptSource``, ``LearnerGroup`` — and checks

  * the error's type and that its message names the file, row or key at fault;
  * a CLI's error is one short line (no traceback, no echo of a huge input);
  * every file under ``tmp_path`` (the run folder, its checkpoints, the bad input itself) is
    unchanged: same set of files, sizes, mtimes and contents (byte-identical).

The train_rl.py cases run the real entry point on a shipped config; every one is refused by the
set-up checks before a Ray cluster starts, so the table stays fast.

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


def snapshot(root: Path) -> dict[str, tuple]:
    """Every file and link under ``root``: mtime, size and content hash (or link target)."""
    import hashlib

    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            body = os.readlink(p) if os.path.islink(p) else hashlib.sha256(Path(p).read_bytes()).hexdigest()
            out[os.path.relpath(p, root)] = (st.st_mtime_ns, st.st_size, body)
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
    return train_rl(["--config", str(cfg)]), CLIError, rf"{cfg}:3:1: invalid YAML: while parsing a flow mapping; expected"


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
            r"the countdown benchmark scores text diffusion models; this checkpoint holds a FlowPolicy")


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
# issue #20: every case through the real entry point (train_rl.main, python -m rlgen.pretrain), each
# refused before a Ray cluster starts
# ----------------------------------------------------------------------------------------------
QUICKSTART, MDM_GRPO, VRPO = "configs/quickstart.yaml", "configs/rl/mdm_grpo_arith.yaml", "configs/dpo/vrpo_arith.yaml"
BASE_OF = {QUICKSTART: FLOW, MDM_GRPO: ARITH, VRPO: ARITH}


def job(tmp, config: str, *overrides: str, name: str = "existing"):
    """train_rl.py on a shipped config, writing into runs/<name> beside the existing run."""
    return train_rl(["--config", str(REPO / config), f"run.root={tmp / 'runs'}", f"run.name={name}",
                     f"policy.checkpoint={BASE_OF[config]}", *overrides])


def pretrain(argv):
    from rlgen.pretrain.__main__ import main

    return cli(main, argv)


def rl_run(tmp, name: str, config: str) -> Path:
    """A finished RL run folder as train_rl.py leaves it: config.yaml, metrics, checkpoints/1 + latest."""
    from rlgen.config import load_config, save_config
    from rlgen.families import get_family  # noqa: F401  (the algorithm registry needs its families)

    run = tmp / "runs" / name
    cfg = load_config(REPO / config, [f"run.root={tmp / 'runs'}", f"run.name={name}",
                                      f"policy.checkpoint={BASE_OF[config]}"])
    save_config(cfg, run / "config.yaml")
    ckpt = run / "checkpoints" / "1"
    shutil.copytree(BASE_OF[config], ckpt)
    from rlgen.algos.base import get_algorithm

    family = get_algorithm(cfg.algo.name).family
    (ckpt / "driver_state.json").write_text(json.dumps({"step": 1, "eval_history": [], "seed": 0,
                                                        "algo": cfg.algo.name, "family": family}))
    (ckpt / "COMPLETE").write_text('{"step": 1}')
    os.symlink("1", run / "checkpoints" / "latest")
    (run / "metrics.jsonl").write_text('{"step": 0}\n{"step": 1, "reward_mean": 0.5}\n')
    return run


def pretraining_run(tmp, name: str = "pre") -> Path:
    """A pretraining run folder (the shipped arith base as its checkpoint 1)."""
    run = tmp / "runs" / name
    ckpt = run / "checkpoints" / "1"
    shutil.copytree(ARITH, ckpt)
    (ckpt / "trainer_state").mkdir()
    (ckpt / "trainer_state" / "state.json").write_text('{"step": 1}')
    (ckpt / "COMPLETE").write_text('{"step": 1}')
    os.symlink("1", run / "checkpoints" / "latest")
    shutil.copy(ARITH / "config.yaml", run / "config.yaml")
    return run


# configs: ranges, attributed to the command line when the command line set them
@case
def config_zero_prompts_per_step(tmp):
    return job(tmp, QUICKSTART, "prompts.per_step=0"), CLIError, \
        r"override 'prompts\.per_step=0': key 'prompts\.per_step' must be >= 1, got 0"


@case
def config_renamed_key_per_iteration(tmp):
    return job(tmp, QUICKSTART, "prompts.per_iteration=0"), CLIError, \
        r"unknown key 'prompts\.per_iteration' for PromptsConfig \(did you mean per_step\?\)"


@case
def config_group_size_one(tmp):
    return job(tmp, MDM_GRPO, "prompts.group_size=1"), CLIError, \
        r"override 'prompts\.group_size=1': key 'prompts\.group_size' must be >= 2 for mdm_grpo"


@case
def config_zero_rollout_steps(tmp):
    return job(tmp, QUICKSTART, "rollout.num_steps=0"), CLIError, \
        r"override 'rollout\.num_steps=0': key 'rollout\.num_steps' must be >= 1, got 0"


@case
def config_negative_noise_level(tmp):
    return job(tmp, QUICKSTART, "rollout.noise_level=-1"), CLIError, \
        r"override 'rollout\.noise_level=-1': key 'rollout\.noise_level' must be > 0, got -1\.0"


@case
def config_nan_noise_level(tmp):
    return job(tmp, QUICKSTART, "rollout.noise_level=nan"), CLIError, \
        r"key 'rollout\.noise_level' must be a finite number, got nan"


@case
def config_nan_learning_rate(tmp):
    return job(tmp, QUICKSTART, "optim.lr=nan"), CLIError, r"override 'optim\.lr=nan': key 'optim\.lr' must be a finite"


@case
def config_word_learning_rate(tmp):  # blames the command line, not configs/quickstart.yaml
    return job(tmp, QUICKSTART, "optim.lr=fast"), CLIError, \
        r"^rc=2: config error: override 'optim\.lr=fast': key 'optim\.lr' must be a number, got 'fast'$"


# files that are not UTF-8 text, or hold a huge line
BINARY = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe"  # a PNG header: its first NUL is on line 3


def _binary(tmp, name: str, data: bytes = BINARY) -> Path:
    p = tmp / name
    p.write_bytes(data)
    return p


@case
def prompts_binary_file(tmp):
    f = _binary(tmp, "prompts.txt")
    return job(tmp, QUICKSTART, "prompts.source=file", f"prompts.file={f}"), CLIError, \
        rf"^rc=2: error: {f}:3: a binary file \(NUL byte at byte 8\)"


@case
def prompts_latin1_file(tmp):
    f = _binary(tmp, "prompts.txt", "a red circle\na blue caf\u00e9 square\n".encode("latin-1"))
    return job(tmp, QUICKSTART, "prompts.source=file", f"prompts.file={f}"), CLIError, \
        rf"{f}:2: not UTF-8 text \(invalid continuation byte at byte 23\)"


@case
def prompts_eval_binary_file(tmp):
    f = _binary(tmp, "eval_prompts.txt")
    return job(tmp, QUICKSTART, f"eval.prompts={f}"), CLIError, rf"{f}:3: a binary file"


@case
def problems_eval_binary_file(tmp):
    f = _binary(tmp, "problems.jsonl", b'{"task": "arith", "expression": "12+34"}\n\xff\xfe{}\n')
    return job(tmp, MDM_GRPO, f"eval.problems={f}"), CLIError, rf"{f}:2: not UTF-8 text \(invalid start byte"


@case
def pairs_binary_file(tmp):
    f = _binary(tmp, "pairs.jsonl")
    return job(tmp, VRPO, f"pairs.path={f}"), CLIError, rf"{f}:3: a binary file"


HUGE = "a red circle " * 280_000  # 3.6 MB on one line


@case
def prompts_huge_line(tmp):
    f = write(tmp / "prompts.txt", f"a red circle\n{HUGE}\n")
    return job(tmp, QUICKSTART, "prompts.source=file", f"prompts.file={f}"), CLIError, \
        rf"^rc=2: error: {f}:2: a prompt of 3639999 characters \(at most 2000\)$"


@case
def prompts_eval_huge_line(tmp):
    f = write(tmp / "eval_prompts.txt", f"a red circle\n{HUGE}\n")
    return job(tmp, QUICKSTART, f"eval.prompts={f}"), CLIError, rf"^rc=2: error: {f}:2: a prompt of 3639999 characters"


@case
def problems_eval_huge_line(tmp):
    f = write(tmp / "problems.jsonl", json.dumps({"task": "arith", "expression": "1" * 3_600_000}) + "\n")
    return job(tmp, MDM_GRPO, f"eval.problems={f}"), CLIError, rf"^rc=2: error: {f}:1: a line of 3600035 characters"


# rewards: a trl-style reward that scores nothing
def _trl_none(prompts, completions, **kwargs):
    return [None for _ in completions]


@case
def reward_trl_none_for_every_sample(tmp):
    from rewards.base import RewardError, RewardMixer

    mixer = RewardMixer({"rewards": {f"{__name__}:_trl_none": 1.0}})
    return (lambda: mixer(["1", "2", "3"], ["p0", "p1", "p2"])), RewardError, \
        rf"reward '{__name__}:_trl_none' returned None for all 3 samples \(first prompt 'p0'\).*reward_nan=drop"


# resumes into another job's folder, or from something that is no checkpoint of this job
@case
def resume_mdm_grpo_into_a_flow_grpo_run(tmp):
    rl_run(tmp, "flow", QUICKSTART)
    return job(tmp, MDM_GRPO, "run.resume=auto", name="flow"), CLIError, \
        rf"^rc=2: error: run\.resume=auto: {tmp / 'runs' / 'flow'} holds a flow_grpo run; this job is mdm_grpo"


@case
def resume_flow_grpo_into_a_text_run(tmp):
    rl_run(tmp, "text", MDM_GRPO)
    return job(tmp, QUICKSTART, "run.resume=auto", name="text"), CLIError, \
        rf"run\.resume=auto: {tmp / 'runs' / 'text'} holds a mdm_grpo run; this job is flow_grpo"


@case
def resume_flow_grpo_from_a_text_run_folder(tmp):
    text = rl_run(tmp, "text", MDM_GRPO)
    return job(tmp, QUICKSTART, f"run.resume={text}"), CLIError, \
        rf"run\.resume: {text / 'checkpoints' / '1'} is a checkpoint of mdm_grpo on a masked_lm model; this job " \
        rf"is flow_grpo on a flow model"


@case
def resume_rl_from_a_pretraining_run(tmp):
    pre = pretraining_run(tmp)
    return job(tmp, MDM_GRPO, f"run.resume={pre}"), CLIError, \
        rf"run\.resume: {pre / 'checkpoints' / '1'} holds no driver_state\.json: not a checkpoint of a train_rl\.py job"


@case
def resume_pretraining_into_an_rl_run(tmp):
    run = rl_run(tmp, "text", MDM_GRPO)
    return pretrain(["--config", str(REPO / "configs/pretrain/mdm_arith.yaml"), f"run.root={tmp / 'runs'}",
                     "run.name=text", "run.resume=auto"]), CLIError, \
        rf"^rc=2: error: run\.resume=auto: {run} holds an RL \(train_rl\.py\) run; this job is mdm_pretrain"


@case
def resume_from_a_file(tmp):
    f = tmp / "runs" / "existing" / "metrics.jsonl"
    return job(tmp, QUICKSTART, f"run.resume={f}"), CLIError, rf"^rc=2: error: run\.resume: {f} is not a checkpoint"


@case
def resume_pretraining_from_a_file(tmp):
    f = tmp / "runs" / "existing" / "metrics.jsonl"
    return pretrain(["--config", str(REPO / "configs/pretrain/mdm_arith.yaml"), f"run.root={tmp / 'runs'}",
                     "run.name=new", f"run.resume={f}"]), CLIError, rf"^rc=2: error: {f} is neither a checkpoint"


# pairs whose prompt contradicts the problem its verifier and answer width come from
@case
def pairs_prompt_contradicts_its_problem(tmp):
    row = {"prompt": "12+34=", "chosen": "64", "rejected": "65", "meta": {"problem": {"task": "arith",
                                                                                      "expression": "47+85"}}}
    f = write(tmp / "pairs.jsonl", json.dumps(row) + "\n")
    return job(tmp, VRPO, f"pairs.path={f}"), CLIError, \
        rf"{f}: row 1: prompt '12\+34=' contradicts its meta\.problem, whose prompt is '47\+85='"


@case
def pairs_malformed_problem(tmp):
    from rlgen.data.pairs import PairFormatError, load_pairs

    row = {"prompt": "12+34=", "chosen": "64", "rejected": "65", "meta": {"problem": {"task": "arith"}}}
    f = write(tmp / "pairs.jsonl", json.dumps(row) + "\n")
    return lambda: load_pairs(f), PairFormatError, rf"{f}: row 1: meta\.problem: arith problem is missing field"


# the starting model
@case
def checkpoint_misspelled_without_pretrain_config(tmp):
    typo = tmp / "flow_shapes_bse"
    return job(tmp, MDM_GRPO, f"policy.checkpoint={typo}"), CLIError, \
        rf"^rc=2: error: policy\.checkpoint: {typo} not found \(give an existing"


@case
def checkpoint_misspelled_on_the_command_line(tmp):  # quickstart's pretrain_config is for its own base
    typo = tmp / "flow_shapes_bse"
    return job(tmp, QUICKSTART, f"policy.checkpoint={typo}"), CLIError, \
        rf"^rc=2: error: policy\.checkpoint: {typo} not found \(set in the command line\); " \
        rf"policy\.pretrain_config \(set in {REPO / QUICKSTART}\) pretrains only the base that"


# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_clear_error_and_touches_nothing(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a default runs/ folder would land here, and be caught below
    make_existing_run(tmp_path)
    call, exc, match = CASES[name](tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(exc, match=match) as info:
        call()
    if exc is CLIError:  # one short line, not a traceback
        msg = str(info.value)
        assert "Traceback" not in msg and msg.strip().count("\n") == 0 and len(msg) < 600, msg[:2000]
    assert snapshot(tmp_path) == before, f"{name} changed files under {tmp_path}"


def test_the_suite_covers_every_kind_of_input():
    kinds = {n.split("_")[0] for n in CASES}
    assert {"config", "checkpoint", "tokenizer", "problems", "prompts", "reward", "image", "pairs", "resume"} <= kinds
    assert len(CASES) >= 70



# ----------------------------------------------------------------------------------------------
# inputs that are not errors: what happens instead
# ----------------------------------------------------------------------------------------------
def test_arith_verifier_scores_a_huge_answer_zero():
    """int() refuses strings over 4300 digits; a model's runaway answer must score 0, not raise."""
    from rewards.base import RewardMixer
    from rlgen.data.arith import verify_arith

    problem = {"task": "arith", "expression": "12+34"}
    huge = "1" * 5000
    assert verify_arith(problem, huge) == 0.0 and verify_arith(problem, huge, partial=True) == 0.0
    assert verify_arith(problem, "64" + "0" * 5000) == 1.0  # zero-padding of any length is still 46
    mixer = RewardMixer({"rewards": {"arith_verifier": 1.0}})
    out = mixer([huge, "64"], ["12+34=", "12+34="], problem=[problem, problem])
    assert out.total.tolist() == [0.0, 1.0]


def test_reward_none_for_every_sample_is_counted_with_drop():
    from rewards.base import RewardMixer

    name = f"{__name__}:_trl_none"
    out = RewardMixer({"rewards": {name: 1.0}, "nan": "drop"})(["1", "2", "3"], ["p0", "p1", "p2"])
    assert out.valid.tolist() == [False] * 3 and out.metrics[f"reward/{name}/none"] == 3


def test_pretrain_config_set_with_the_checkpoint_pretrains_a_missing_base(tmp_path, monkeypatch):
    """The other side of checkpoint_misspelled_on_the_command_line: both keys on the command line
    (or both in one file) ask for a new base, and it is pretrained at that path."""
    import rlgen.runtime.rundir as rundir
    from rlgen.config import load_config
    from rlgen.runtime import setup

    calls = []  # pretraining itself is tested in tests/pretrain; here: that it is asked for
    monkeypatch.setattr(setup, "pretrain_base", lambda p, config, overrides: calls.append((p, config)))
    monkeypatch.setattr(rundir, "resolve_checkpoint", lambda p: p)
    new = tmp_path / "new_base"
    pre = str(REPO / "configs/pretrain/flow_shapes.yaml")
    cfg = load_config(REPO / QUICKSTART, [f"policy.checkpoint={new}", f"policy.pretrain_config={pre}"])
    assert setup.base_checkpoint(cfg.policy, cfg) == new and calls == [(new, pre)]


@pytest.mark.slow
def test_eval_and_save_every_zero_mean_start_and_end(tmp_path):
    """eval.every=0 and train.save_every=0: evaluate and save only at the start and the end (they
    divided by zero after the first step); a trl reward that scores nothing, with reward_nan=drop,
    is counted in every row (reward_none) and the run goes on. ~60 s (a 2-step text job on Ray)."""
    import train_rl as t
    from rlgen.runtime.rundir import read_metrics
    from tests.runtime.tiny import save_tiny_lm

    save_tiny_lm(tmp_path / "lm", max_length=16)
    rc = t.main(["--config", str(REPO / MDM_GRPO), f"policy.checkpoint={tmp_path / 'lm'}", f"run.root={tmp_path}",
                 "run.name=r", "train.steps=2", "eval.every=0", "train.save_every=0", "train.max_minutes=0",
                 "rewards={arith_partial: 1.0, 'tests.test_bad_inputs:_trl_none': 1.0}", "reward_nan=drop",
                 "prompts.per_step=4", "prompts.group_size=4", "eval.options={n_per_level: 4}", "eval.pass_k=0",
                 "run.progress=false", "run.tensorboard=false", "run.device=cpu", "ray.num_cpus=3",
                 "resources.rollout_threads=1", "resources.learner_threads=1"])
    assert rc == 0
    rows = read_metrics(tmp_path / "r")
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert ["eval/accuracy" in r for r in rows] == [True, False, True]
    assert [r["reward_none"] for r in rows[1:]] == [16, 16]
    assert sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir()) == ["0", "2", "latest"]
