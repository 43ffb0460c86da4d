"""The center config (`appliance/ingest/config.py`): parsing, errors naming keys, the example
file documenting every key, and `appliance config check` / `keys init` on a center config."""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path
from typing import Any

import pytest

from appliance.core.config import TRANSPORT_KEYS
from appliance.core.errors import ConfigError
from appliance.ingest import config as center
from appliance.ingest.config import Ingest
from tests.peers import REPO, cli, to_toml
from tests.test_config import _HEADER, _KEY, _doc_above, _toml_literal

EXAMPLE = REPO / "config" / "center.example.toml"
SHM = Path("/dev/shm")  # noqa: S108 - only named as another file system, never written
MAIN = Path("/etc/appliance/center.toml")


def valid(tmp: Path = Path("/srv")) -> dict[str, Any]:
    return {"ingest": {"name": "rc-1", "drop_dir": str(tmp / "drop"), "key": "keys/center.key",
                       "signing_key": "keys/sign.key",
                       "pacs": {"host": "127.0.0.1", "port": 4242, "ae_title": "PACS", "plaintext": True}}}


def problems(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as e:
        center.parse(data, {}, MAIN)
    return e.value.problems


def test_a_minimal_center_config_parses_with_defaults_and_relative_paths() -> None:
    cfg = center.parse(valid(), {}, MAIN)
    ing = cfg.ingest
    assert ing.key == Path("/etc/appliance/keys/center.key")
    assert ing.state_dir == Path("/var/lib/appliance-ingest") and ing.poll_s == 5.0
    assert ing.pacs.transport == "dicom" and ing.pacs.port == 4242 and ing.pacs.plaintext


def test_every_problem_names_its_key() -> None:
    data = valid()
    data["ingest"]["poll_s"] = 0
    data["ingest"]["pacs"]["port"] = 70000
    data["ingest"]["colour"] = "blue"
    data["ingest"]["retry_min_s"] = 900
    del data["ingest"]["key"]
    found = problems(data)
    assert f"{MAIN}: ingest.poll_s: must be 0.1..3600" in found
    assert f"{MAIN}: ingest.pacs.port: must be 1..65535" in found
    assert f"{MAIN}: ingest.colour: unknown key" in found
    assert f"{MAIN}: ingest.key: is required" in found
    assert f"{MAIN}: ingest.retry_min_s: must not be greater than ingest.retry_max_s" in found


def test_the_pacs_table_is_required_and_plaintext_must_be_explicit() -> None:
    data = valid()
    del data["ingest"]["pacs"]
    assert any("ingest.pacs: is required" in p for p in problems(data))
    data = valid()
    del data["ingest"]["pacs"]["plaintext"]
    assert any("ingest.pacs.tls: is required" in p for p in problems(data))


def test_a_center_config_is_told_apart_from_an_appliance_config() -> None:
    assert center.is_center_config(valid())
    assert not center.is_center_config({"receive": {}, "ingest": {}})
    assert not center.is_center_config({"appliance": {}})


# --- the example documents every key ----------------------------------------------------------


def center_keys() -> dict[str, Any]:
    keys: dict[str, Any] = {"ingest": dataclasses.MISSING}
    for f in dataclasses.fields(Ingest):
        if f.name != "pacs":
            keys[f"ingest.{f.name}"] = f.default
    keys["ingest.pacs"] = dataclasses.MISSING
    defaults = {f.name: f.default for f in dataclasses.fields(center.Destination)}
    for k in TRANSPORT_KEYS["dicom"]:
        keys[f"ingest.pacs.{k}"] = defaults[k]
    for k in ("cert", "key", "ca"):
        keys[f"ingest.pacs.tls.{k}"] = dataclasses.MISSING
    return keys


def example_keys() -> dict[str, int]:
    found: dict[str, int] = {}
    section = ""
    for n, line in enumerate(EXAMPLE.read_text().splitlines()):
        if m := _HEADER.match(line):
            section = m.group(1)
            found.setdefault(section, n)
        elif m := _KEY.match(line):
            found.setdefault(f"{section}.{m.group(1)}", n)
    return found


def test_the_example_documents_every_key() -> None:
    code, doc = set(center_keys()), set(example_keys())
    assert code - doc == set(), "keys missing from config/center.example.toml"
    assert doc - code == set(), "keys in config/center.example.toml that the code lacks"


def test_the_example_explains_every_key_and_states_its_default() -> None:
    lines = EXAMPLE.read_text().splitlines()
    where = example_keys()
    for key, default in center_keys().items():
        if key in ("ingest", "ingest.pacs", "ingest.pacs.tls"):
            continue
        doc = _doc_above(lines, where[key])
        assert len(doc) > 20, f"{key} has no explanation above it"
        if default is not dataclasses.MISSING and isinstance(default, bool | int | float | str | Path):
            assert _toml_literal(default) in doc, f"{key}: default {default!r} not stated"
    assert typing.get_type_hints(Ingest)  # the tree is introspectable


def test_the_example_passes_config_check_once_its_keys_and_folders_exist(tmp_path: Path) -> None:
    etc = tmp_path / "etc" / "appliance"
    text = (EXAMPLE.read_text().replace("/etc/appliance", str(etc))
            .replace("/var/lib/appliance-ingest", str(tmp_path / "state"))
            .replace("/srv/sftp/drop", str(tmp_path / "drop")))
    etc.mkdir(parents=True)
    main = etc / "center.toml"
    main.write_text(text)
    (tmp_path / "drop").mkdir()
    tls = center.load(main).ingest.pacs.tls
    assert tls is not None
    for p in (tls.cert, tls.key, tls.ca):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("placeholder\n")
    tls.key.chmod(0o600)
    before = cli("config", "check", "--config", str(main))
    assert before.returncode == 78 and "ingest.key: key file" in before.stderr, before.stderr
    r = cli("keys", "init", "--config", str(main))
    assert r.returncode == 0, r.stderr
    assert (etc / "keys" / "center.pub").is_file() and (etc / "keys" / "receipt-signing.pub").is_file()
    r = cli("config", "check", "--json", "--config", str(main))
    assert r.returncode == 0, r.stderr
    eff = json.loads(r.stdout)
    assert eff["ingest"]["name"] == "reading-center-1"
    assert eff["ingest"]["pacs"]["tls"]["ca"] == str(tls.ca)
    assert set(eff["ingest"]["pacs"]) == {f"{k}" for k in TRANSPORT_KEYS["dicom"]} - {"calling_ae_title",
                                                                                    "commitment_port"}


def test_config_check_names_a_state_dir_on_another_file_system(tmp_path: Path) -> None:
    # /dev/shm is a tmpfs of its own on Debian; the state dir is only named, never created.
    assert SHM.stat().st_dev != tmp_path.stat().st_dev
    data = valid(tmp_path)
    (tmp_path / "drop").mkdir()
    data["ingest"]["state_dir"] = str(SHM / "never-created-ingest-state")
    main = tmp_path / "center.toml"
    main.write_text(to_toml(data))
    assert cli("keys", "init", "--config", str(main)).returncode == 0
    r = cli("config", "check", "--config", str(main))
    assert r.returncode == 78
    assert f"ingest.state_dir: {SHM}/never-created-ingest-state is not on the file system" in r.stderr
    assert not (SHM / "never-created-ingest-state").exists()


def test_ingest_needs_a_center_config(tmp_path: Path) -> None:
    r = cli("ingest")
    assert r.returncode == 64 and "--config CENTER.toml is required" in r.stderr
    appliance = tmp_path / "appliance.toml"
    appliance.write_text(to_toml({"appliance": {"name": "a"}}))
    r = cli("ingest", "--once", "--config", str(appliance))
    assert r.returncode == 78
    assert f"{appliance}: appliance: unknown key" in r.stderr
    assert f"{appliance}: ingest: is required" in r.stderr
