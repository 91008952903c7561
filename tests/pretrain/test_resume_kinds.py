"""Every pretraining kind, through the shared loop: a crash mid-run, then ``run.resume=auto``, ends
with the same weights (published model and trainer state) as an uninterrupted run. Flow matching and
masked diffusion have their own tests (test_flow_matching.py, test_masked_diffusion.py); these are
the kinds that gained exact resume from the loop: the AR teacher, CLIP (its published weights are
float16, so resuming from them alone could not be exact), the classifier (one-cycle schedule) and
the aesthetic head (dropout: the global RNG)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from rlgen.config import load_config
from rlgen.pretrain.loop import run_pretraining
from rlgen.registry import PRETRAINERS

COMMON = ["run.progress=false", "run.tensorboard=false", "run.num_threads=1"]


def _pairs(tmp_path: Path) -> Path:
    from PIL import Image

    from rlgen.data import shapes as S

    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    rows = []
    for i in range(12):
        Image.fromarray(S.render(S.scene_for_prompt(rng, f"a red {S.SHAPES[i % 3]}"))).save(tmp_path / "img" / f"r{i}.png")
        Image.fromarray(S.render(S.scene_for_prompt(rng, f"a blue {S.SHAPES[i % 3]}"))).save(tmp_path / "img" / f"b{i}.png")
        rows.append({"prompt": "p", "chosen": f"img/r{i}.png", "rejected": f"img/b{i}.png"})
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path / "pairs.jsonl"


def _kind_args(kind: str, tmp_path: Path) -> tuple[str, list[str]]:
    if kind == "ar_pretrain":
        return "configs/pretrain/ar_arith.yaml", [
            "data.num_train=300", "data.eval_n_per_level=3", "model.hidden_size=64", "model.num_heads=2",
            "model.num_kv_heads=1", "model.intermediate_size=64", "train.batch_size=16", "train.max_steps=6",
            "train.warmup_steps=2", "train.log_every=2", "train.eval_every=3", "train.checkpoint_every=3"]
    if kind == "clip_pretrain":
        return "configs/pretrain/clip_shapes.yaml", [
            "train.batch_size=16", "train.max_steps=6", "train.warmup_steps=2", "train.log_every=2",
            "train.checkpoint_every=3", "data.eval_per_group=4", "data.eval_candidates=4"]
    if kind == "classifier_pretrain":
        from rlgen.data import fashion_mnist as fm

        try:
            fm.load_arrays("test")
        except fm.DatasetMissingError:
            pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
        # 0.077 epochs of the 10k test images at batch 128: 6 updates of the one-cycle schedule
        return "configs/pretrain/fashion_classifier.yaml", [
            "data.train_split=test", "train.epochs=0.077", "train.checkpoint_every=3", "model.channels=[8, 8, 8]",
            "model.feature_dim=8"]
    return "configs/pretrain/aesthetic_head.yaml", [
        f"data.pairs={_pairs(tmp_path)}", "data.heldout_frac=0.25", "hidden=[16, 8, 8, 4]", "train.steps=6",
        "train.batch_size=8", "train.checkpoint_every=3"]


def _tensors(ckpt: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {str(f.relative_to(ckpt)): load_file(str(f)) for f in sorted(ckpt.rglob("*.safetensors"))}


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("kind", ["ar_pretrain", "clip_pretrain", "classifier_pretrain", "aesthetic_pretrain"])
def test_crash_and_resume_equals_an_uninterrupted_run(kind, tmp_path, monkeypatch):
    config, extra = _kind_args(kind, tmp_path)
    task_cls = PRETRAINERS.get(kind)

    def cfg(name, *more):
        return load_config(config, [*COMMON, *extra, f"run.root={tmp_path}", f"run.name={name}", *more])

    c = cfg("straight")
    ref = run_pretraining(c, task_cls(c))
    assert ref.name == "6" and (ref / "config.yaml").is_file()

    real = task_cls.train_step

    def crashing(self, step):
        if step == 4:
            raise RuntimeError("simulated crash")
        return real(self, step)

    monkeypatch.setattr(task_cls, "train_step", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        c = cfg("crashy")
        run_pretraining(c, task_cls(c))
    monkeypatch.setattr(task_cls, "train_step", real)
    c = cfg("crashy", "run.resume=auto")
    ckpt = run_pretraining(c, task_cls(c))
    a, b = _tensors(ref), _tensors(ckpt)
    assert a.keys() == b.keys() and len(a) >= 2  # the published model and trainer_state/model.safetensors
    for name in a:
        assert a[name].keys() == b[name].keys(), name
        assert all(torch.equal(a[name][k], b[name][k]) for k in a[name]), name
    steps = [json.loads(line)["step"] for line in (tmp_path / "crashy" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 6  # no step logged twice after the resume
