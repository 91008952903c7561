"""Run as a script by tests/runtime/test_safe_load.py (DeepSpeed's process group is process-global,
so each stage runs in a fresh process, one rank):

    python ds_roundtrip.py STAGE OUT_DIR resume   # train 2 steps, save, train 2 more; reload, train the
                                                  # same 2 steps; print the max abs weight difference
    python ds_roundtrip.py STAGE OUT_DIR save     # train 2 steps and save to OUT_DIR/ckpt (rlgen's layout)
    python ds_roundtrip.py STAGE OUT_DIR load     # build the engine and load OUT_DIR/ckpt; print its client state

Saving and loading go through rlgen's ``DeepSpeedStrategy`` (``save``/``load``), so ``load`` is the
weights-only path the learners use on ``run.resume``.
"""
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def build(stage: int):
    from rlgen.runtime.engine import DeepSpeedStrategy, OptimConfig

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    strategy = DeepSpeedStrategy(stage, OptimConfig(lr=1e-2, weight_decay=0.01), rank=0, world_size=1,
                                 zero3_persistence_threshold=0)
    return strategy, strategy.prepare(net)


def train(engine, first: int, steps: int) -> None:
    for i in range(first, first + steps):
        gen = torch.Generator().manual_seed(i)
        x, y = torch.randn(4, 6, generator=gen), torch.randn(4, 3, generator=gen)
        loss = ((engine(x) - y) ** 2).mean()
        engine.backward(loss)
        engine.step()


def weights(strategy, engine) -> dict:
    named = [(n, p) for n, p in engine.ds.module.named_parameters()]
    return strategy.gather_numpy(named)


def main() -> None:
    from rlgen.runtime.engine import DeepSpeedStrategy, OptimConfig
    from rlgen.runtime.rendezvous import free_port

    stage, out, mode = int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    torch.set_num_threads(1)
    # one rank on loopback, as the in-process preference learner does (make_engine)
    DeepSpeedStrategy(0, OptimConfig(), rank=0, world_size=1).init_distributed("127.0.0.1", free_port())
    strategy, engine = build(stage)
    if mode in ("resume", "save"):
        train(engine, 0, 2)
        strategy.save(engine, out / "ckpt", {"version": 2})
    if mode == "save":
        return
    if mode == "resume":
        train(engine, 2, 2)
        straight = weights(strategy, engine)
        strategy, engine = build(stage)
    state = strategy.load(engine, out / "ckpt")
    if mode == "load":
        print(json.dumps(state))
        return
    train(engine, 2, 2)
    resumed = weights(strategy, engine)
    diff = max(float(abs(straight[k] - resumed[k]).max()) for k in straight)
    print(json.dumps({"version": state.get("version"), "max_abs_diff": diff}))


if __name__ == "__main__":
    main()
