import subprocess
import sys


def test_open_clip_imports_in_a_fresh_process():
    # The torchvision schema patch must run on `import rlgen` in every new process.
    code = "import rlgen, open_clip, torchvision.transforms; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")


def test_patch_is_idempotent():
    from rlgen._compat import patch_torchvision

    first = patch_torchvision()
    assert patch_torchvision() == first
