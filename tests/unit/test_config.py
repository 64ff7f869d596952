"""Layered configuration: precedence, provenance and errors that name key, value and source."""

from __future__ import annotations

from pathlib import Path

import pytest

from mongarsd.config import Config, load_config
from mongarsd.errors import ConfigError


def _profiles(tmp_path: Path, text: str = "") -> Path:
    d = tmp_path / "boards"
    d.mkdir(exist_ok=True)
    (d / "generic.toml").write_text(text)
    return d


def test_defaults_when_nothing_is_set(tmp_path: Path) -> None:
    loaded = load_config(env={}, profiles=_profiles(tmp_path), config_path=None)
    assert loaded.config.server.port == 8642
    assert loaded.config.server.host == "127.0.0.1"
    assert loaded.sources == {}


def test_each_layer_overrides_the_one_below_and_is_named(tmp_path: Path) -> None:
    profiles = _profiles(tmp_path, "[inference]\nslots = 2\nn_ctx = 4096\n[server]\nport = 1000\n")
    cfg_file = tmp_path / "m.toml"
    cfg_file.write_text("[inference]\nslots = 3\n[server]\nport = 2000\n")
    env = {"MONGARSD_SERVER__PORT": "3000", "MONGARSD_MESH__SEEDS": "a:1, b:2"}
    loaded = load_config(env=env, profiles=profiles, config_path=cfg_file, cli={"server": {"port": 4000, "host": None}})
    c = loaded.config
    assert c.inference.n_ctx == 4096 and loaded.sources["inference.n_ctx"] == "board:generic"
    assert c.inference.slots == 3 and loaded.sources["inference.slots"] == f"file:{cfg_file}"
    assert c.mesh.seeds == ("a:1", "b:2") and loaded.sources["mesh.seeds"] == "env:MONGARSD_MESH__SEEDS"
    assert c.server.port == 4000 and loaded.sources["server.port"] == "cli:--port"
    assert loaded.sources.get("server.host") is None  # a None CLI flag does not count


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"MONGARSD_SERVER__PORT": "abc"}, "server.port = 'abc' from env:MONGARSD_SERVER__PORT: expected an integer"),
        ({"MONGARSD_SERVER__PORT": "70000"}, "server.port = '70000' from env:MONGARSD_SERVER__PORT: must be a TCP/UDP port"),
        ({"MONGARSD_AUTH__LOOPBACK_TRUSTED": "maybe"}, "auth.loopback_trusted = 'maybe'"),
        ({"MONGARSD_SERVER__NOPE": "1"}, "unknown key server.nope in env:MONGARSD_SERVER__NOPE"),
        ({"MONGARSD_NOPE__X": "1"}, "unknown section [nope]"),
        ({"MONGARSD_LOG__FORMAT": "xml"}, "log.format = 'xml' from env:MONGARSD_LOG__FORMAT: must be one of auto, json, console"),
        ({"MONGARSD_PORT": "1"}, "expected MONGARSD_<SECTION>__<KEY>"),
        (
            {"MONGARSD_INFERENCE__PREFETCH_BYTES": "-64"},
            "inference.prefetch_bytes = '-64' from env:MONGARSD_INFERENCE__PREFETCH_BYTES: must be between 0 and 1048576",
        ),
    ],
)
def test_bad_values_name_key_value_and_source(tmp_path: Path, env: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(env=env, profiles=_profiles(tmp_path))
    assert needle in str(err.value)


def test_bad_file_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[server]\nport = 'x'\n")
    with pytest.raises(ConfigError, match=r"server.port = 'x' from file:.*bad.toml: expected an integer"):
        load_config(env={}, profiles=_profiles(tmp_path), config_path=bad)
    bad.write_text("[server\nport=1")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(env={}, profiles=_profiles(tmp_path), config_path=bad)
    bad.write_text("[server]\nport = true\n")
    with pytest.raises(ConfigError, match="expected an integer, got a boolean"):
        load_config(env={}, profiles=_profiles(tmp_path), config_path=bad)
    with pytest.raises(ConfigError, match="file not found"):
        load_config(env={}, profiles=_profiles(tmp_path), config_path=tmp_path / "missing.toml")


def test_unknown_profile_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown board profile 'toaster'"):
        load_config(profile="toaster", env={}, profiles=_profiles(tmp_path))


def test_config_is_frozen(tmp_path: Path) -> None:
    c = load_config(env={}, profiles=_profiles(tmp_path)).config
    assert isinstance(c, Config)
    with pytest.raises(AttributeError):
        c.server.port = 1  # type: ignore[misc]


def test_rows_cover_every_key_with_a_source(tmp_path: Path) -> None:
    loaded = load_config(env={"MONGARSD_INFERENCE__SLOTS": "2"}, profiles=_profiles(tmp_path))
    rows = {k: s for k, _, s in loaded.rows()}
    assert rows["inference.slots"] == "env:MONGARSD_INFERENCE__SLOTS"
    assert rows["server.port"] == "default"
    assert len(rows) > 40


def test_shipped_profiles_are_valid() -> None:
    from mongarsd.config import PROFILE_NAMES, profiles_dir

    for name in PROFILE_NAMES:
        assert (profiles_dir() / f"{name}.toml").is_file(), name
        load_config(profile=name, env={})
