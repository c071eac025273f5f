"""The mechanism registry: lookups name the known mechanisms, settings are typed, a name is
registered once, and the description lists every mechanism with its settings."""
import pytest

from layers import registry
from layers.registry import Mechanism, Setting, SettingError


def test_lookup_errors_name_the_known_mechanisms():
    with pytest.raises(ValueError, match=r"unknown token mechanism 'swiglu'; known: \('attn'"):
        registry.get("swiglu", "token")
    assert registry.get("swiglu", "channel").slot == "channel"
    assert set(registry.names("token")) >= {"attn", "swa", "gdn", "deltanet", "la", "gla"}
    assert "swiglu" not in registry.names("token")


def test_settings_are_typed():
    s = Setting(1.0, float)
    assert s.coerce("x", 2) == 2.0 and isinstance(s.coerce("x", 2), float)
    for bad in (True, "1", None, [1]):
        with pytest.raises(SettingError, match="x: must be a float"):
            s.coerce("x", bad)
    with pytest.raises(SettingError, match="n: must be a int"):
        Setting(1, int).coerce("n", True)     # a bool is not a count
    assert Setting(None, int, optional=True).coerce("n", None) is None
    with pytest.raises(SettingError, match="window: unknown field of mechanism 'gdn'"):
        registry.get("gdn").resolve({"window": 3})


def test_a_name_is_registered_once_and_defaults_match_their_types():
    gdn = registry.get("gdn")
    with pytest.raises(ValueError, match="registered twice"):
        registry.register(gdn)
    with pytest.raises(SettingError, match="must be a int"):
        registry.register(Mechanism("bad_default", "token", lambda *a: None,
                                    {"n": Setting(0.5, int)}))
    assert "bad_default" not in registry.names("token")


def test_describe_lists_every_mechanism_and_setting():
    text = registry.describe()
    for slot in registry.SLOTS:
        for name in registry.names(slot):
            row = next(line for line in text.splitlines() if line.startswith(f"| `{name}` |"))
            for field in registry.get(name).settings:
                assert f"`{field}`" in row, (name, field)
