"""The shared pretraining loop on a toy task: run-folder layout, logging windows worked out by hand,
pruning, the wall budget, and a crash + ``run.resume=auto`` that ends bit-identical to a straight run
(the toy draws from the global torch, numpy and Python RNGs as well as its own generator, so every
one of them has to come back)."""
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from rlgen.runtime.rundir import RunConfig
from rlgen.pretrain.loop import (LoopPlan, load_torch_state, load_weights, run_pretraining, save_torch_state,
                                 save_weights, task_state_path)
from rlgen.runtime.rundir import CheckpointError, read_metrics


@dataclass
class ToyConfig:
    kind: str = "toy"
    run: RunConfig = field(default_factory=RunConfig)
    steps: int = 7


class ToyTask:
    """Regression of a dropout MLP on x·w + noise; records its own losses so tests can average them."""

    def __init__(self, cfg, plan: LoopPlan, crash_at: int | None = None):
        self.cfg, self._plan, self.crash_at = cfg, plan, crash_at
        self.losses: dict[int, float] = {}
        self.evaluated: list[int] = []

    def plan(self) -> LoopPlan:
        return self._plan

    def init(self, resume):
        self.net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 1))
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=0.05)
        self.gen = torch.Generator().manual_seed(self.cfg.run.seed + 7)

    def train_step(self, step: int) -> dict:
        if step == self.crash_at:
            raise RuntimeError("simulated crash")
        self.net.train()
        x = torch.randn(16, 3, generator=self.gen)
        noise = float(np.random.rand()) + random.random()  # global numpy / Python RNGs
        y = x @ torch.tensor([[1.0], [-2.0], [0.5]]) + noise
        loss = torch.nn.functional.mse_loss(self.net(x), y)  # dropout: the global torch RNG
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        self.losses[step + 1] = loss.item()
        return {"loss": loss.item(), "double": 2 * loss.item()}

    def evaluate(self, step: int) -> dict:
        self.evaluated.append(step)
        return {"eval_norm": sum(p.detach().norm().item() for p in self.net.parameters())}

    def report(self):
        return {"evaluated": self.evaluated}

    def save(self, d: Path) -> dict:
        save_file({k: v.contiguous() for k, v in self.net.state_dict().items()}, str(d / "toy.safetensors"))
        save_weights(self.net, d)
        save_torch_state(task_state_path(d, "optimizer.pt"), {"optimizer": self.opt.state_dict(),
                                                              "gen": self.gen.get_state()})
        return {"evaluated": list(self.evaluated)}

    def load(self, d: Path, state: dict) -> None:
        load_weights(self.net, d)
        extra = load_torch_state(task_state_path(d, "optimizer.pt"))
        self.opt.load_state_dict(extra["optimizer"])
        self.gen.set_state(extra["gen"])
        self.evaluated = list(state["evaluated"])


def _cfg(tmp_path, name, resume="no") -> ToyConfig:
    return ToyConfig(run=RunConfig(name=name, root=str(tmp_path), resume=resume, tensorboard=False, progress=False,
                                   num_threads=1, seed=3))


PLAN = dict(last_step=7, log_every=2, eval_every=3, checkpoint_every=3)


def test_layout_logging_windows_and_pruning(tmp_path):
    task = ToyTask(_cfg(tmp_path, "a"), LoopPlan(**PLAN, keep_checkpoints=2))
    ckpt = run_pretraining(task.cfg, task)
    run = tmp_path / "a"
    assert ckpt == run / "checkpoints" / "7" and (run / "checkpoints" / "latest").resolve().name == "7"
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == ["6", "7"]  # 3 pruned
    assert (run / "config.yaml").is_file() and (ckpt / "config.yaml").is_file()
    assert json.loads((ckpt / "eval.json").read_text()) == {"evaluated": [3, 6, 7]}  # every 3rd step + the end
    rows = {r["step"]: r for r in read_metrics(run)}
    assert sorted(rows) == [2, 3, 4, 6, 7]  # log steps 2, 4, 6, the end, and the evaluations
    L = task.losses
    # training scalars are means over the updates since the last row that carried them
    assert rows[2]["loss"] == pytest.approx((L[1] + L[2]) / 2)
    assert "loss" not in rows[3] and "eval_norm" in rows[3]
    assert rows[4]["loss"] == pytest.approx((L[3] + L[4]) / 2) and rows[4]["double"] == pytest.approx(L[3] + L[4])
    assert rows[6]["loss"] == pytest.approx((L[5] + L[6]) / 2) and rows[7]["loss"] == pytest.approx(L[7])
    state = json.loads((ckpt / "trainer_state" / "state.json").read_text())
    assert state["step"] == 7 and state["metrics"]["loss"] == rows[7]["loss"]


def test_crash_then_resume_auto_is_bit_identical(tmp_path):
    straight = ToyTask(_cfg(tmp_path, "straight"), LoopPlan(**PLAN))
    ref = run_pretraining(straight.cfg, straight)
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashy = ToyTask(_cfg(tmp_path, "crashy"), LoopPlan(**PLAN), crash_at=4)  # during update 5
        run_pretraining(crashy.cfg, crashy)
    assert [r["step"] for r in read_metrics(tmp_path / "crashy")] == [2, 3, 4]
    assert (tmp_path / "crashy" / "checkpoints" / "latest").resolve().name == "3"
    resumed = ToyTask(_cfg(tmp_path, "crashy", "auto"), LoopPlan(**PLAN))
    ckpt = run_pretraining(resumed.cfg, resumed)
    assert sorted(resumed.losses) == [4, 5, 6, 7]  # restarted after checkpoint 3
    assert all(resumed.losses[s] == straight.losses[s] for s in resumed.losses)
    for name in ("toy.safetensors", "trainer_state/model.safetensors"):
        a, b = load_file(str(ref / name)), load_file(str(ckpt / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    a, b = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "crashy")
    assert [r["step"] for r in b] == [r["step"] for r in a]
    drop = ("elapsed_min", "steps_per_s")
    assert [{k: v for k, v in r.items() if k not in drop} for r in a] == \
        [{k: v for k, v in r.items() if k not in drop} for r in b]
    assert json.loads((ckpt / "eval.json").read_text()) == {"evaluated": [3, 6, 7]}

    # resuming a finished run trains nothing and returns its last checkpoint
    again = ToyTask(_cfg(tmp_path, "crashy", "auto"), LoopPlan(**PLAN))
    assert run_pretraining(again.cfg, again) == ckpt and again.losses == {}


def test_wall_budget_stops_with_a_final_checkpoint(tmp_path):
    task = ToyTask(_cfg(tmp_path, "budget"), LoopPlan(last_step=50, checkpoint_every=10, max_minutes=1e-9))
    ckpt = run_pretraining(task.cfg, task)
    assert ckpt.name == "1" and task.evaluated == [1]
    assert [r["step"] for r in read_metrics(tmp_path / "budget")] == [1]


def test_resume_from_a_checkpoint_without_trainer_state_is_a_clear_error(tmp_path):
    old = tmp_path / "old" / "checkpoints" / "5"
    old.mkdir(parents=True)
    (old / "COMPLETE").write_text("{}")
    (old / "trainer_state.pt").write_bytes(b"")  # an older rlgen's layout
    task = ToyTask(_cfg(tmp_path, "old", "auto"), LoopPlan(**PLAN))
    with pytest.raises(CheckpointError, match=r"checkpoints/5 has no trainer_state/state.json"):
        run_pretraining(task.cfg, task)


def test_run_num_threads_applies_to_the_job_only(tmp_path):
    before = torch.get_num_threads()
    task = ToyTask(_cfg(tmp_path, "threads"), LoopPlan(last_step=1))
    task.cfg.run.num_threads = before + 1
    seen = []
    real = task.train_step
    task.train_step = lambda step: (seen.append(torch.get_num_threads()), real(step))[1]
    run_pretraining(task.cfg, task)
    assert seen == [before + 1] and torch.get_num_threads() == before


def test_every_shipped_pretrain_config_names_a_registered_task():
    from rlgen.config import read_yaml
    from rlgen.registry import PRETRAINERS

    files = sorted(Path("configs/pretrain").glob("*.yaml"))
    assert len(files) >= 10
    for f in files:
        task_cls = PRETRAINERS.get(read_yaml(f)["kind"])
        assert all(callable(getattr(task_cls, m, None)) for m in ("plan", "init", "train_step", "save", "load")), f
