"""Make torchvision's pure-Python parts importable beside a CPU-only torch.

PyPI's torchvision (pulled in by open_clip/timm) can be a CUDA build whose C extension does not
load beside torch's CPU build; importing torchvision then dies with
``operator torchvision::nms does not exist`` because its Python code registers fake kernels for
ops whose schemas come from that extension. We check whether the extension loads; only if it does
not, we declare the two op schemas torchvision's import needs. Its C++ ops stay unavailable (rlgen
never calls them). Where torchvision works (GPU installs) this does nothing.

It must run in every process that may import torchvision (Ray actors, torchrun ranks, vLLM's
engine), which is why ``import rlgen`` runs it.
"""
from __future__ import annotations

import glob
import importlib.util
import os

_DONE = False
_LIB = None  # keep the Library object alive: dropping it unregisters the schemas


def _extension_loads(package_dir: str) -> bool:
    import torch

    for so in glob.glob(os.path.join(package_dir, "_C*.so")) + glob.glob(os.path.join(package_dir, "_C*.pyd")):
        try:
            torch.ops.load_library(so)
            return True
        except (OSError, RuntimeError):
            return False
    return False


def patch_torchvision() -> bool:
    """Returns True when the schemas had to be declared, False when nothing was needed."""
    global _DONE, _LIB
    if _DONE:
        return _LIB is not None
    _DONE = True
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    import torch

    if _extension_loads(list(spec.submodule_search_locations)[0]):
        return False
    try:  # another library may have declared them already
        torch._C._dispatch_find_schema_or_throw("torchvision::nms", "")
        return False
    except RuntimeError:
        pass
    _LIB = torch.library.Library("torchvision", "FRAGMENT")
    _LIB.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIB.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    return True
