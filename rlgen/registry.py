"""Name → object registries for models, datasets, rewards and algorithms.

Three ways to name a component in a config, tried in this order:
1. a name registered in-process with ``@register_<kind>("name")``;
2. a ``module.path:attribute`` reference, imported on demand;
3. an installed entry point in the group ``rlgen.<kind>s`` (e.g. ``rlgen.rewards``), so a pip
   package can ship rewards or models without touching rlgen.
"""
from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any, Callable


class RegistryError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; we want it readable
        return str(self.args[0])


class Registry:
    def __init__(self, kind: str, builtin_modules: tuple[str, ...] = ()):
        self.kind = kind
        self.group = f"rlgen.{kind}s"
        self._items: dict[str, Any] = {}
        # Modules whose import registers the built-in entries; imported on first lookup so that
        # `import rlgen.registry` does not pull in torch models or open_clip.
        self._builtin_modules = builtin_modules
        self._loaded_builtins = False

    def register(self, name: str, obj: Any = None, *, overwrite: bool = False):
        def deco(o):
            if name in self._items and self._items[name] is not o and not overwrite:
                raise RegistryError(f"{self.kind} '{name}' is already registered ({self._items[name]!r})")
            self._items[name] = o
            return o

        return deco(obj) if obj is not None else deco

    def _load_builtins(self) -> None:
        if self._loaded_builtins:
            return
        self._loaded_builtins = True
        for mod in self._builtin_modules:
            try:
                importlib.import_module(mod)
            except ModuleNotFoundError as e:
                if e.name != mod:  # the module exists but a dependency of it is missing: a real error
                    raise

    def names(self) -> list[str]:
        self._load_builtins()
        eps = [ep.name for ep in entry_points(group=self.group)]
        return sorted(set(self._items) | set(eps))

    def get(self, name: str) -> Any:
        if not isinstance(name, str) or not name:
            raise RegistryError(f"{self.kind} name must be a non-empty string, got {name!r}")
        self._load_builtins()
        if name in self._items:
            return self._items[name]
        if ":" in name:
            return _import_ref(name, self.kind)
        for ep in entry_points(group=self.group):
            if ep.name == name:
                obj = ep.load()
                self._items[name] = obj
                return obj
        raise RegistryError(f"unknown {self.kind} '{name}'; registered: {', '.join(self.names()) or '(none)'}; "
                            f"or give 'module.path:attribute', or install an entry point in group '{self.group}'")

    def __contains__(self, name: str) -> bool:
        try:
            self.get(name)
            return True
        except RegistryError:
            return False


def _import_ref(ref: str, kind: str) -> Any:
    mod_name, _, attr = ref.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise RegistryError(f"{kind} '{ref}': cannot import module '{mod_name}': {e}") from e
    obj = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise RegistryError(f"{kind} '{ref}': module '{mod_name}' has no attribute '{attr}'")
        obj = getattr(obj, part)
    return obj


# Built-in modules register themselves on import; listed here so a lookup finds them lazily.
MODELS = Registry("model", ("rlgen.models.flow", "rlgen.models.masked_lm", "rlgen.models.classifier",
                            "rlgen.models.diffusion_gemma", "rlgen.models.diffusers_flow"))
DATASETS = Registry("dataset", ("rlgen.data.shapes", "rlgen.data.fashion_mnist", "rlgen.data.digits",
                                "rlgen.data.text_tasks"))
REWARDS = Registry("reward", ("rewards.shapes_verifier", "rewards.text_verifiers", "rewards.math_answer",
                              "rewards.code_tests", "rewards.clip_score",
                              "rewards.aesthetic", "rewards.fashion_classifier", "rewards.llm_judge", "rewards.examples",
                              "rewards.remote", "rewards.pickscore", "rewards.hpsv2", "rewards.ocr"))
ALGORITHMS = Registry("algorithm", ("rlgen.algos.flow_grpo", "rlgen.algos.diffusion_dpo", "rlgen.algos.vrpo",
                                    "rlgen.algos.mdm_grpo", "rlgen.algos.opd", "rlgen.algos.reinforce",
                                    "rlgen.algos.wd1", "rlgen.algos.spg", "rlgen.algos.g2rpo"))
BENCHMARKS = Registry("benchmark", ("rlgen.eval.shapes", "rlgen.eval.fashion_mnist", "rlgen.eval.text",
                                    "rlgen.eval.prompt_reward"))


def register_model(name: str) -> Callable:
    return MODELS.register(name)


def register_dataset(name: str) -> Callable:
    return DATASETS.register(name)


def register_reward(name: str) -> Callable:
    return REWARDS.register(name)


def register_algorithm(name: str) -> Callable:
    """Registers an ``rlgen.algos.base.Algorithm`` subclass (see that module)."""
    from rlgen.algos.base import register_algorithm as register

    return register(name)


def register_benchmark(name: str) -> Callable:
    return BENCHMARKS.register(name)


def _pretrain_modules() -> tuple[str, ...]:
    """Every module of rlgen/pretrain registers its kind (config + task) on import: adding a
    pretraining kind is adding one module there, no list to edit."""
    import pkgutil
    from pathlib import Path

    here = Path(__file__).resolve().parent / "pretrain"
    return tuple(f"rlgen.pretrain.{m.name}" for m in pkgutil.iter_modules([str(here)])
                 if not m.name.startswith("_") and m.name != "loop")


# Pretraining kinds: config ``kind`` → task class (``rlgen.pretrain.loop``'s task protocol),
# registered beside the config class with ``@register_pretrainer(kind)``.
PRETRAINERS = Registry("pretrainer", _pretrain_modules())


def register_pretrainer(kind: str) -> Callable:
    return PRETRAINERS.register(kind)
