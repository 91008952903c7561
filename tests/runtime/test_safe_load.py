"""DeepSpeed checkpoints load without unpickling arbitrary objects (rlgen/runtime/safe_load.py).

Genuine ZeRO 0-3 checkpoints written by DeepSpeed load through ``DeepSpeedStrategy.load`` and the
resumed engine takes exactly the steps the uninterrupted one took (max abs difference 0.0: a load
that dropped the optimizer state or the weights would differ). A crafted file whose unpickling
would write a marker is refused, naming the file, and the marker never appears.
"""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HELPER = Path(__file__).with_name("ds_roundtrip.py")


def _run(stage: int, out: Path, mode: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(HELPER), str(stage), str(out), mode], capture_output=True, text=True,
                          timeout=600)


def _last_json(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def zero2_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero2")
    return out, _last_json(_run(2, out, "resume"))


def test_zero2_checkpoint_resumes_identically_weights_only(zero2_run):
    _, result = zero2_run
    assert result == {"version": 2, "max_abs_diff": 0.0}


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 3])
def test_zero_stage_checkpoint_resumes_identically_weights_only(tmp_path, stage):
    assert _last_json(_run(stage, tmp_path, "resume")) == {"version": 2, "max_abs_diff": 0.0}


class _Boom:
    """Unpickling this writes a marker file: proof that a pickle was executed."""

    marker = ""

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pickle code ran"))


def _craft(ckpt: Path, name: str, marker: Path) -> Path:
    import torch

    target = next((ckpt / "deepspeed").rglob(name))
    _Boom.marker = str(marker)
    state = {"optimizer_state_dict": {"evil": _Boom()}, "ds_version": "0.19.8"}
    torch.save(state, target)
    return target


@pytest.mark.parametrize("name", ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "mp_rank_00_model_states.pt"])
def test_crafted_file_is_found_before_loading(zero2_run, tmp_path, name):
    from rlgen.runtime.safe_load import UnsafeCheckpointError, check_checkpoint_files

    src, _ = zero2_run
    ckpt = tmp_path / "ckpt"
    shutil.copytree(src / "ckpt", ckpt)
    check_checkpoint_files(ckpt)  # DeepSpeed's own files pass
    marker = tmp_path / "PWNED"
    bad = _craft(ckpt, name, marker)
    with pytest.raises(UnsafeCheckpointError, match=rf"^{bad}: refusing to load .*references builtins.getattr, "
                                                    rf"pathlib.Path"):
        check_checkpoint_files(ckpt)
    assert not marker.exists()


def test_resume_from_a_crafted_optimizer_file_refuses_and_runs_nothing(zero2_run, tmp_path):
    src, _ = zero2_run
    shutil.copytree(src / "ckpt", tmp_path / "ckpt")
    marker = tmp_path / "PWNED"
    bad = _craft(tmp_path / "ckpt", "zero_pp_rank_0_mp_rank_00_optim_states.pt", marker)
    proc = _run(2, tmp_path, "load")
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1].removeprefix("[rank0]: ")  # torch.distributed tags stderr
    assert last.startswith(f"rlgen.runtime.safe_load.UnsafeCheckpointError: {bad}: refusing to load"), last
    assert "GLOBAL" in last, last  # names what the file asked for
    assert not marker.exists()
