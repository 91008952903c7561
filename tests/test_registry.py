import pytest

from rlgen.registry import REWARDS, Registry, RegistryError


def test_register_and_get():
    reg = Registry("widget")

    @reg.register("double")
    def double(x):
        return 2 * x

    assert reg.get("double")(3) == 6
    assert "double" in reg.names()
    with pytest.raises(RegistryError, match="already registered"):
        reg.register("double", lambda x: x)


def test_unknown_name_lists_choices():
    reg = Registry("widget")
    reg.register("a", object())
    with pytest.raises(RegistryError) as e:
        reg.get("b")
    msg = str(e.value)
    assert "unknown widget 'b'" in msg and "a" in msg and "rlgen.widgets" in msg


def test_module_path_reference():
    import os.path

    reg = Registry("widget")
    assert reg.get("os.path:join") is os.path.join
    with pytest.raises(RegistryError, match="cannot import module"):
        reg.get("no_such_module_xyz:f")
    with pytest.raises(RegistryError, match="no attribute"):
        reg.get("os.path:no_such_fn")


def test_entry_point_discovery():
    # rlgen's own pyproject declares rewards.examples:constant_half in group rlgen.rewards
    fn = REWARDS.get("constant_half")
    assert fn(None, ["p", "q"]) == [0.5, 0.5]
