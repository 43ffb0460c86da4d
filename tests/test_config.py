"""Configuration: parsing (pure), loading with conf.d drop-ins, the CLI check, the example.

Every kind of mistake a technician can make must come back as a ConfigError line that
names the file and the dotted key, and through `appliance config check` as exit code 78
with that key on stderr. The example file must document every key the code has.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import pkgutil
import re
import shutil
import typing
from pathlib import Path
from typing import Any

import pytest

from appliance.core import config
from appliance.core.config import Config
from appliance.core.errors import EX_CONFIG, ConfigError
from tests.peers import REPO, base_config, cli, to_toml

MAIN = Path("/etc/appliance/appliance.toml")
EXAMPLE = REPO / "config" / "appliance.example.toml"


def valid() -> dict[str, Any]:
    """The smallest valid config: one allowed caller (everything else has a default)."""
    return {"receive": {"callers": [{"ae_title": "CT"}]}}


def parse(data: dict[str, Any], origins: dict[str, Path] | None = None) -> Config:
    return config.parse(data, origins or {}, MAIN)


def problems(data: dict[str, Any], origins: dict[str, Path] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as e:
        parse(data, origins)
    assert e.value.exit_code == EX_CONFIG
    assert str(e.value) == "\n".join(e.value.problems)
    return e.value.problems


def one_problem(data: dict[str, Any]) -> str:
    ps = problems(data)
    assert len(ps) == 1, ps
    return ps[0]


def with_(**sections: Any) -> dict[str, Any]:
    d = valid()
    for name, body in sections.items():
        if isinstance(body, dict) and isinstance(d.get(name), dict):
            d[name] = {**d[name], **body}
        else:
            d[name] = body
    return d


DICOM = {"name": "pacs", "transport": "dicom", "host": "10.8.0.1", "ae_title": "PACS",
         "plaintext": True}
SFTP = {"name": "drop", "transport": "sftp", "host": "upload.example", "user": "edge",
        "key": "/k/id", "known_hosts": "/k/known_hosts"}
DIRECTORY = {"name": "outbox", "transport": "directory", "path": "/srv/outbox"}


# --- defaults -------------------------------------------------------------------------


def test_minimal_config_parses_with_documented_defaults() -> None:
    cfg = parse(valid())
    assert cfg.receive.ae_title == "EDGE" and cfg.receive.port == 104
    assert cfg.receive.callers == (config.Caller("CT"),)
    assert cfg.spool.key_file == Path("/etc/appliance/keys/spool.key")
    assert cfg.pack.codec == "jpeg2000" and cfg.pack.verify is True
    assert cfg.destinations == ()
    assert cfg.sources == (MAIN,)


def test_accept_any_caller_defaults_to_false() -> None:
    assert parse(valid()).receive.accept_any_caller is False
    assert config.Receive().accept_any_caller is False


def test_empty_callers_without_accept_any_caller_is_an_error() -> None:
    p = one_problem({})
    assert p.startswith(f"{MAIN}: receive.callers: is empty")
    assert one_problem({"receive": {"callers": []}}).startswith(f"{MAIN}: receive.callers: is empty")


def test_accept_any_caller_true_needs_no_callers() -> None:
    assert parse({"receive": {"accept_any_caller": True}}).receive.callers == ()


def test_receive_tls_defaults() -> None:
    tls = {"cert": "/t/c.pem", "key": "/t/k.pem", "ca": "/t/ca.pem"}
    cfg = parse(with_(receive={"tls": tls}))
    assert cfg.receive.tls == config.ReceiveTLS(2762, Path("/t/c.pem"), Path("/t/k.pem"),
                                                Path("/t/ca.pem"), None, True)


def test_destination_transport_defaults() -> None:
    cfg = parse(with_(destinations=[{**DICOM}, SFTP, DIRECTORY]))
    dicom, sftp, directory = cfg.destinations
    assert (dicom.port, dicom.timeout_s, dicom.tls, dicom.calling_ae_title) == (104, 30.0, None, None)
    assert dicom.link_timeout_s == 6.0
    assert (sftp.port, sftp.remote_dir, sftp.key_passphrase) == (22, ".", None)
    assert directory.path == Path("/srv/outbox")


# --- unknown keys ---------------------------------------------------------------------


@pytest.mark.parametrize("data, key", [
    pytest.param(with_(recieve={"port": 104}), "recieve", id="top-level"),
    pytest.param(with_(receive={"prot": 104}), "receive.prot", id="nested"),
    pytest.param(with_(spool={"keyfile": "/k"}), "spool.keyfile", id="spool"),
    pytest.param({"receive": {"callers": [{"ae_title": "CT"}, {"ae_title": "MR", "host": "1.2.3.4"}]}},
                 "receive.callers[1].host", id="caller"),
    pytest.param(with_(destinations=[DIRECTORY, {**DICOM, "colour": "red"}]),
                 "destinations[1].colour", id="destination"),
    pytest.param(with_(destinations=[{**DICOM, "plaintext": False,
                                      "tls": {"cert": "/c", "key": "/k", "ca": "/a", "pin": "x"}}]),
                 "destinations[0].tls.pin", id="destination-tls"),
    pytest.param(with_(receive={"tls": {"cert": "/c", "key": "/k", "ca": "/a", "verify": True}}),
                 "receive.tls.verify", id="receive-tls"),
])
def test_unknown_key_is_an_error(data: dict[str, Any], key: str) -> None:
    assert one_problem(data) == f"{MAIN}: {key}: unknown key"


def test_key_of_another_transport_is_named_as_such() -> None:
    p = one_problem(with_(destinations=[{**DIRECTORY, "host": "10.1.1.1"}]))
    assert p == f"{MAIN}: destinations[0].host: does not apply to transport 'directory'"


def test_unknown_transport_gives_one_problem_not_one_per_key() -> None:
    p = one_problem(with_(destinations=[{"name": "x", "transport": "ftp", "host": "h", "port": 21}]))
    assert p.startswith(f"{MAIN}: destinations[0].transport: must be one of")
    assert "'ftp'" in p


def test_missing_transport_is_required() -> None:
    p = one_problem(with_(destinations=[{"name": "x", "path": "/p"}]))
    assert p == f"{MAIN}: destinations[0].transport: is required (dicom, sftp or directory)"


# --- wrong types ----------------------------------------------------------------------


@pytest.mark.parametrize("data, expect", [
    pytest.param(with_(receive={"port": "104"}), "receive.port: must be an integer, not a string",
                 id="string-for-port"),
    pytest.param(with_(receive={"port": 104.0}), "receive.port: must be an integer, not a number",
                 id="float-for-port"),
    pytest.param(with_(receive={"port": True}), "receive.port: must be an integer, not a boolean",
                 id="bool-for-port"),
    pytest.param(with_(receive={"accept_any_caller": 1}),
                 "receive.accept_any_caller: must be true or false, not an integer", id="int-for-bool"),
    pytest.param(with_(pack={"verify": "yes"}), "pack.verify: must be true or false, not a string",
                 id="string-for-bool"),
    pytest.param(with_(pack={"study_quiet_s": "10s"}), "pack.study_quiet_s: must be a number, not a string",
                 id="string-for-number"),
    pytest.param(with_(appliance={"name": 7}), "appliance.name: must be a string, not an integer",
                 id="int-for-string"),
    pytest.param(with_(spool={"key_file": 1}), "spool.key_file: must be a non-empty path string",
                 id="int-for-path"),
    pytest.param(with_(receive=5), "receive: must be a table, not an integer", id="scalar-for-table"),
    pytest.param(with_(destinations={"name": "x"}), "destinations: must be an array of tables",
                 id="table-for-array"),
    pytest.param(with_(destinations=["outbox"]), "destinations[0]: must be a table, not a string",
                 id="string-in-array"),
    pytest.param({"receive": {"callers": "CT"}}, "receive.callers: must be an array of tables",
                 id="string-for-callers"),
    pytest.param(with_(encryption={"recipients": "/k/center.pub"}),
                 "encryption.recipients: must be an array of paths, not a string", id="string-for-list"),
    pytest.param(with_(pack={"codec": "jpeg"}), "pack.codec: must be one of jpeg2000, jpeg-ls, none",
                 id="bad-choice"),
    pytest.param(with_(receive={"bind": "localhost"}), "receive.bind: 'localhost' is not an IP address",
                 id="bind-not-ip"),
    pytest.param({"receive": {"callers": [{"ae_title": "CT", "hosts": ["10.1.2.300"]}]}},
                 "receive.callers[0].hosts: '10.1.2.300' is not an IP address or network",
                 id="bad-host"),
    pytest.param({"receive": {"callers": [{"ae_title": "CT", "hosts": "10.1.2.3"}]}},
                 "receive.callers[0].hosts: must be an array", id="hosts-not-array"),
])
def test_wrong_type_names_key_and_expected_type(data: dict[str, Any], expect: str) -> None:
    assert one_problem(data).startswith(f"{MAIN}: {expect}")


# --- ranges ---------------------------------------------------------------------------


@pytest.mark.parametrize("section, key, value, expect", [
    ("receive", "port", 0, "must be 1..65535"),
    ("receive", "port", 65536, "must be 1..65535"),
    ("receive", "max_associations", 0, "must be 1..64"),
    ("receive", "max_connections", 0, "must be 1..1024"),
    ("receive", "max_connections_per_host", 1025, "must be 1..1024"),
    ("receive", "max_pdu", 100, "must be 4096..16777216"),
    ("receive", "dimse_timeout_s", 0, "must be 1..3600"),
    ("receive", "acse_timeout_s", float("nan"), "must be 1..600"),
    ("spool", "reserve_free_mb", -1, "must be 0..10000000"),
    ("pack", "study_quiet_s", 0.1, "must be 0.5..3600"),
    ("pack", "segment_max_instances", 0, "must be 1..100000"),
    ("pack", "first_segment_instances", 0, "must be 1..100000"),
    ("pack", "segment_max_mb", 20000, "must be 1..16384"),
    ("pack", "segment_max_age_s", float("inf"), "must be 0.5..3600"),
    ("pack", "workers", 257, "must be 0..256"),
    ("queue", "retry_min_s", 0, "must be 0.1..86400"),
    ("queue", "retry_max_s", 8 * 86400, "must be 1..604800"),
    ("queue", "keep_delivered_h", -1, "must be 0..8760"),
    ("queue", "down_after", 0, "must be 1..100"),
    ("queue", "probe_min_s", 0.01, "must be 0.1..3600"),
    ("queue", "probe_max_s", 0.5, "must be 1..86400"),
])
def test_out_of_range_names_the_range(section: str, key: str, value: Any, expect: str) -> None:
    assert one_problem(with_(**{section: {key: value}})) == f"{MAIN}: {section}.{key}: {expect}"


def test_range_limits_are_inclusive() -> None:
    cfg = parse(with_(receive={"port": 65535, "max_associations": 1},
                      spool={"reserve_free_mb": 0}, pack={"workers": 0}))
    assert (cfg.receive.port, cfg.spool.reserve_free_mb) == (65535, 0)


def test_destination_port_range() -> None:
    p = one_problem(with_(destinations=[DIRECTORY, {**DICOM, "port": 70000}]))
    assert p == f"{MAIN}: destinations[1].port: must be 1..65535"


def test_destination_link_timeout_range() -> None:
    p = one_problem(with_(destinations=[{**DICOM, "link_timeout_s": 1}]))
    assert p == f"{MAIN}: destinations[0].link_timeout_s: must be 2..600"


def test_max_connections_below_max_associations() -> None:
    p = one_problem(with_(receive={"max_associations": 16, "max_connections": 8,
                                   "max_connections_per_host": 8}))
    assert p == (f"{MAIN}: receive.max_connections: must be at least receive.max_associations "
                 "(16): every association is a connection")


def test_max_connections_per_host_above_max_connections() -> None:
    p = one_problem(with_(receive={"max_connections": 8, "max_connections_per_host": 9}))
    assert p == (f"{MAIN}: receive.max_connections_per_host: must not be greater than "
                 "receive.max_connections (8)")


def test_retry_min_greater_than_max() -> None:
    p = one_problem(with_(queue={"retry_min_s": 100, "retry_max_s": 10}))
    assert p == f"{MAIN}: queue.retry_min_s: must not be greater than queue.retry_max_s"


def test_probe_min_greater_than_max() -> None:
    p = one_problem(with_(queue={"probe_min_s": 100, "probe_max_s": 10}))
    assert p == f"{MAIN}: queue.probe_min_s: must not be greater than queue.probe_max_s"


# --- AE titles, names, duplicates -------------------------------------------------------


def test_duplicate_caller_ae_title() -> None:
    p = one_problem({"receive": {"callers": [{"ae_title": "CT"}, {"ae_title": "CT"}]}})
    assert p.startswith(f"{MAIN}: receive.callers[1].ae_title: duplicate")
    assert "receive.callers[0].ae_title" in p


def test_duplicate_caller_ae_title_ignores_padding() -> None:
    """DICOM pads AE titles with spaces: 'CT ' and 'CT' are the same caller."""
    p = one_problem({"receive": {"callers": [{"ae_title": "CT"}, {"ae_title": "CT  "}]}})
    assert "receive.callers[1].ae_title: duplicate" in p


def test_destination_ae_title_longer_than_16() -> None:
    p = one_problem(with_(destinations=[DIRECTORY, {**DICOM, "ae_title": "A" * 17}]))
    assert p == f"{MAIN}: destinations[1].ae_title: longer than 16 characters"


@pytest.mark.parametrize("ae, expect", [
    ("A" * 17, "longer than 16 characters"),
    ("   ", "must not be empty"),
    ("", "must not be empty"),
    ("CT\\1", "may contain only printable ASCII"),
    ("CT\u00e9", "may contain only printable ASCII"),
    ("CT\t1", "may contain only printable ASCII"),
])
def test_bad_ae_titles(ae: str, expect: str) -> None:
    p = one_problem(with_(receive={"ae_title": ae}))
    assert p.startswith(f"{MAIN}: receive.ae_title: {expect}")


def test_ae_title_of_16_characters_is_fine() -> None:
    assert parse(with_(receive={"ae_title": "A" * 16})).receive.ae_title == "A" * 16


def test_duplicate_destination_names() -> None:
    p = one_problem(with_(destinations=[DIRECTORY, {**DIRECTORY, "path": "/other"}]))
    assert p.startswith(f"{MAIN}: destinations[1].name: duplicate of destinations[0].name")


def test_duplicate_destination_name_found_even_if_entry_has_other_problems() -> None:
    ps = problems(with_(destinations=[DIRECTORY, {"name": "outbox", "transport": "ftp"}]))
    assert any("destinations[1].name: duplicate" in p for p in ps)


@pytest.mark.parametrize("name", ["has space", "-leading", "x" * 64, "ümlaut"])
def test_bad_names(name: str) -> None:
    assert one_problem(with_(appliance={"name": name})).startswith(f"{MAIN}: appliance.name: ")
    p = one_problem(with_(destinations=[{**DIRECTORY, "name": name}]))
    assert p.startswith(f"{MAIN}: destinations[0].name: ")


# --- destinations ---------------------------------------------------------------------


def test_dicom_without_tls_and_without_plaintext_is_an_error() -> None:
    dest = {k: v for k, v in DICOM.items() if k != "plaintext"}
    p = one_problem(with_(destinations=[dest]))
    assert p.startswith(f"{MAIN}: destinations[0].tls: is required; or set plaintext = true")


def test_dicom_plaintext_false_without_tls_is_an_error() -> None:
    p = one_problem(with_(destinations=[{**DICOM, "plaintext": False}]))
    assert "destinations[0].tls: is required" in p


def test_dicom_with_tls_and_plaintext_is_an_error() -> None:
    dest = {**DICOM, "tls": {"cert": "/c", "key": "/k", "ca": "/a"}}
    assert one_problem(with_(destinations=[dest])).startswith(
        f"{MAIN}: destinations[0].plaintext: is true but tls is also set")


def test_dicom_with_tls_parses() -> None:
    dest = {**DICOM, "plaintext": False, "tls": {"cert": "c.pem", "key": "k.pem", "ca": "ca.pem"}}
    d = parse(with_(destinations=[dest])).destinations[0]
    assert d.tls == config.TLSClient(Path("/etc/appliance/c.pem"), Path("/etc/appliance/k.pem"),
                                     Path("/etc/appliance/ca.pem"))


@pytest.mark.parametrize("missing", ["host", "user", "key"])
def test_sftp_required_keys(missing: str) -> None:
    dest = {k: v for k, v in SFTP.items() if k != missing}
    assert one_problem(with_(destinations=[dest])) == f"{MAIN}: destinations[0].{missing}: is required"


FINGERPRINT = "SHA256:qTcQuS4Cz2A9ysJQjGEoDbc6Hw9XC1frtYLLvetAV/Y"


def test_sftp_host_key_may_be_pinned_by_fingerprint() -> None:
    dest = {k: v for k, v in SFTP.items() if k != "known_hosts"}
    d = parse(with_(destinations=[{**dest, "host_key_sha256": FINGERPRINT}])).destinations[0]
    assert (d.host_key_sha256, d.known_hosts) == (FINGERPRINT, None)


def test_sftp_without_a_host_key_pin_is_refused() -> None:
    dest = {k: v for k, v in SFTP.items() if k != "known_hosts"}
    assert one_problem(with_(destinations=[dest])) == (
        f"{MAIN}: destinations[0].known_hosts: or host_key_sha256 is required (the server's host key)")


def test_sftp_with_two_host_key_pins_is_refused() -> None:
    p = one_problem(with_(destinations=[{**SFTP, "host_key_sha256": FINGERPRINT}]))
    assert p == f"{MAIN}: destinations[0].host_key_sha256: and known_hosts are both set: choose one"


@pytest.mark.parametrize("bad", ["qTcQuS4Cz2A9ysJQjGEoDbc6Hw9XC1frtYLLvetAV/Y", "SHA256:short",
                                 "MD5:16:27:ac:a5:76:28:2d:36:63:1b:56:4d:eb:df:a6:48"])
def test_sftp_host_key_sha256_must_be_a_sha256_fingerprint(bad: str) -> None:
    dest = {k: v for k, v in SFTP.items() if k != "known_hosts"}
    p = one_problem(with_(destinations=[{**dest, "host_key_sha256": bad}]))
    assert p.startswith(f"{MAIN}: destinations[0].host_key_sha256: must be SHA256: and 43 base64")


def test_dicom_required_keys() -> None:
    ps = problems(with_(destinations=[{"name": "pacs", "transport": "dicom", "plaintext": True}]))
    assert ps == [f"{MAIN}: destinations[0].host: is required",
                  f"{MAIN}: destinations[0].ae_title: is required"]


def test_receive_plain_false_without_tls_is_an_error() -> None:
    assert "receive.plain: is false but there is no [receive.tls]" in one_problem(
        with_(receive={"plain": False}))


def test_receive_tls_port_same_as_plain_port() -> None:
    tls = {"cert": "/c", "key": "/k", "ca": "/a", "port": 104}
    assert "receive.tls.port: is the same as receive.port (104)" in one_problem(
        with_(receive={"tls": tls}))


def test_receive_tls_missing_files_are_required() -> None:
    ps = problems(with_(receive={"tls": {"port": 2762}}))
    assert ps == [f"{MAIN}: receive.tls.{k}: is required" for k in ("cert", "key", "ca")]


def test_caller_hosts_are_normalised() -> None:
    cfg = parse({"receive": {"callers": [{"ae_title": "CT", "hosts": ["10.1.2.3", "10.1.2.9/24"]}]}})
    assert cfg.receive.callers[0].hosts == ("10.1.2.3", "10.1.2.0/24")


# --- several problems, files, paths ---------------------------------------------------


def test_several_problems_are_all_listed() -> None:
    data = {
        "recieve": {},
        "receive": {"port": "104", "accept_any_caller": 1,
                    "callers": [{"ae_title": "CT"}, {"ae_title": "CT"}]},
        "pack": {"codec": "gif", "workers": -1},
        "destinations": [{**DICOM, "ae_title": "X" * 17}, {**DIRECTORY, "name": "pacs"},
                         {k: v for k, v in DICOM.items() if k not in ("plaintext", "name")}
                         | {"name": "b"}],
    }
    ps = problems(data)
    keys = [p.split(": ")[1] for p in ps]
    assert sorted(keys) == sorted([
        "receive.port", "receive.accept_any_caller", "receive.callers[1].ae_title",
        "pack.codec", "pack.workers", "destinations[0].ae_title", "destinations[1].name",
        "destinations[2].tls", "recieve",
    ])
    assert all(p.startswith(f"{MAIN}: ") for p in ps)


def test_problem_names_the_file_that_set_the_key() -> None:
    dropin = Path("/etc/appliance/conf.d/50-site.toml")
    ps = problems(with_(receive={"port": 0}, pack={"workers": -1}),
                  origins={"receive.port": dropin, "receive": MAIN})
    assert f"{dropin}: receive.port: must be 1..65535" in ps
    assert f"{MAIN}: pack.workers: must be 0..256" in ps


def test_relative_paths_resolve_against_the_file_that_names_them() -> None:
    dropin = Path("/etc/appliance/conf.d/50-site.toml")
    cfg = parse(with_(spool={"key_file": "keys/spool.key"},
                      appliance={"state_dir": "../state"},
                      encryption={"recipients": ["center.pub", "/abs/other.pub"]}),
                origins={"appliance.state_dir": dropin, "encryption.recipients": dropin})
    assert cfg.spool.key_file == Path("/etc/appliance/keys/spool.key")
    assert cfg.appliance.state_dir == Path("/etc/appliance/state")
    assert cfg.encryption.recipients == (Path("/etc/appliance/conf.d/center.pub"), Path("/abs/other.pub"))


def test_path_with_nul_is_refused() -> None:
    assert "must not contain NUL" in one_problem(with_(spool={"key_file": "a\x00b"}))


def test_problem_messages_quote_config_values_only() -> None:
    """Messages carry what the technician wrote, nothing else (there is nothing else)."""
    p = one_problem(with_(pack={"codec": "gif"}))
    assert p == f"{MAIN}: pack.codec: must be one of jpeg2000, jpeg-ls, none (got 'gif')"


# --- effective config -----------------------------------------------------------------


def test_effective_elides_secrets() -> None:
    cfg = parse(with_(destinations=[{**SFTP, "key_passphrase": "hunter2"}]))
    eff = config.effective(cfg)
    assert eff["destinations"][0]["key_passphrase"] == config.ELIDED
    assert "hunter2" not in json.dumps(eff)


def test_effective_shows_only_the_fields_of_each_transport() -> None:
    eff = config.effective(parse(with_(destinations=[DIRECTORY, DICOM, SFTP])))
    directory, dicom, sftp = eff["destinations"]
    common = {"name", "transport", "max_kbit_s", "mode"}  # and cap_hours, when set
    assert set(directory) == common | {"path"}
    assert set(dicom) == common | {"host", "port", "ae_title", "plaintext", "storage_commitment",
                                   "commitment_bind", "commitment_timeout_s", "timeout_s",
                                   "link_timeout_s"}
    assert set(sftp) == common | {"host", "port", "user", "key", "known_hosts", "remote_dir",
                                  "timeout_s", "link_timeout_s", "receipt_overdue_s"}


def test_an_sftp_destination_with_receipt_key_reads_receipts_overdue_after_the_given_time() -> None:
    cfg = parse(with_(destinations=[{**SFTP, "receipt_key": "/k/center.pub",
                                     "receipt_overdue_s": 600}]))
    assert (cfg.destinations[0].receipt_key, cfg.destinations[0].receipt_overdue_s) == (
        Path("/k/center.pub"), 600.0)


def test_receipt_overdue_s_without_receipt_key_is_refused_naming_the_missing_key() -> None:
    p = one_problem(with_(destinations=[{**SFTP, "receipt_overdue_s": 600}]))
    assert "destinations[0].receipt_overdue_s: is set but receipt_key is not" in p


def test_receipt_key_on_a_dicom_destination_is_refused() -> None:
    p = one_problem(with_(destinations=[{**DICOM, "receipt_key": "/k/center.pub"}]))
    assert "destinations[0].receipt_key: does not apply to transport 'dicom'" in p


def test_effective_lists_sources_and_hides_bookkeeping() -> None:
    eff = config.effective(parse(valid()))
    assert eff["sources"] == [str(MAIN)]
    assert "origins" not in eff
    assert list(eff)[:2] == ["sources", "appliance"]
    json.dumps(eff)  # plain data


# --- load: files and drop-ins ----------------------------------------------------------


def write(p: Path, text: str) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


MAIN_TOML = """
[receive]
ae_title = "EDGE"
port = 11112
[[receive.callers]]
ae_title = "CT"
[[receive.callers]]
ae_title = "MR"
[spool]
key_file = "keys/spool.key"
[[destinations]]
name = "first"
transport = "directory"
path = "out1"
[[destinations]]
name = "second"
transport = "directory"
path = "out2"
"""


def test_load_reads_main_file_and_resolves_relative_paths(tmp_path: Path) -> None:
    main = write(tmp_path / "appliance.toml", MAIN_TOML)
    cfg = config.load(main)
    assert cfg.sources == (main,)
    assert cfg.spool.key_file == tmp_path / "keys" / "spool.key"
    assert [d.path for d in cfg.destinations] == [tmp_path / "out1", tmp_path / "out2"]


def test_dropins_apply_in_name_order_later_wins(tmp_path: Path) -> None:
    main = write(tmp_path / "appliance.toml", MAIN_TOML)
    # Written in reverse order, so that neither creation order nor mtime gives the answer.
    b = write(tmp_path / "conf.d" / "20-b.toml", "[receive]\nport = 2000\n")
    a = write(tmp_path / "conf.d" / "10-a.toml", "[receive]\nport = 1000\nae_title = \"EDGE2\"\n")
    cfg = config.load(main)
    assert cfg.sources == (main, a, b)
    assert cfg.receive.port == 2000
    assert cfg.receive.ae_title == "EDGE2"  # tables merge key by key


def test_dropin_replaces_arrays_whole(tmp_path: Path) -> None:
    main = write(tmp_path / "appliance.toml", MAIN_TOML)
    write(tmp_path / "conf.d" / "10.toml",
          '[[receive.callers]]\nae_title = "US"\n'
          '[[destinations]]\nname = "only"\ntransport = "directory"\npath = "/srv/only"\n')
    cfg = config.load(main)
    assert [c.ae_title for c in cfg.receive.callers] == ["US"]
    assert [d.name for d in cfg.destinations] == ["only"]


def test_error_names_the_dropin_that_set_the_bad_key(tmp_path: Path) -> None:
    main = write(tmp_path / "appliance.toml", MAIN_TOML + "[pack]\nworkers = -1\n")
    dropin = write(tmp_path / "conf.d" / "10-site.toml",
                   '[receive]\nport = 0\ncolour = "red"\n'
                   '[[destinations]]\nname = "x"\ntransport = "dicom"\nhost = "h"\nae_title = "A"\n')
    with pytest.raises(ConfigError) as e:
        config.load(main)
    assert sorted(e.value.problems) == sorted([
        f"{dropin}: receive.port: must be 1..65535",
        f"{dropin}: receive.colour: unknown key",
        f"{dropin}: destinations[0].tls: is required; or set plaintext = true to send "
        "unencrypted DICOM (only on a VPN or closed network)",
        f"{main}: pack.workers: must be 0..256",
    ])


def test_later_dropin_takes_over_the_blame(tmp_path: Path) -> None:
    """A key set badly in one drop-in and again in a later one is the later file's."""
    main = write(tmp_path / "appliance.toml", MAIN_TOML)
    write(tmp_path / "conf.d" / "10.toml", "[receive]\nport = 0\n")
    later = write(tmp_path / "conf.d" / "20.toml", "[receive]\nport = 70000\n")
    with pytest.raises(ConfigError) as e:
        config.load(main)
    assert e.value.problems == [f"{later}: receive.port: must be 1..65535"]


def test_dropin_relative_paths_resolve_against_conf_d(tmp_path: Path) -> None:
    main = write(tmp_path / "appliance.toml", MAIN_TOML)
    write(tmp_path / "conf.d" / "10.toml", '[appliance]\nstate_dir = "../state"\n'
          '[encryption]\nrecipients = ["center.pub"]\n')
    cfg = config.load(main)
    assert cfg.spool.key_file == tmp_path / "keys" / "spool.key"  # from the main file
    assert cfg.appliance.state_dir == tmp_path / "state"
    assert cfg.encryption.recipients == (tmp_path / "conf.d" / "center.pub",)


def test_config_knows_which_file_set_a_key(tmp_path: Path) -> None:
    main = write(tmp_path / "appliance.toml", MAIN_TOML)
    dropin = write(tmp_path / "conf.d" / "10.toml", '[spool]\nkey_file = "/k/spool.key"\n')
    cfg = config.load(main)
    assert cfg.file_of("spool.key_file") == dropin
    assert cfg.file_of("receive.port") == main
    assert cfg.file_of("queue.retry_min_s") == main  # a default belongs to the main file
    assert cfg.file_of("destinations[1].path") == main


def test_hidden_and_non_toml_dropins_are_not_read(tmp_path: Path) -> None:
    main = write(tmp_path / "appliance.toml", MAIN_TOML)
    write(tmp_path / "conf.d" / ".10.toml", "[receive]\nport = 1\n")
    write(tmp_path / "conf.d" / "20.toml.dpkg-old", "[receive]\nport = 2\n")
    write(tmp_path / "conf.d" / "30.toml~", "[receive]\nport = 3\n")
    (tmp_path / "conf.d" / "40.toml").mkdir()
    cfg = config.load(main)
    assert cfg.receive.port == 11112
    assert cfg.sources == (main,)


def test_invalid_toml_names_file_and_line(tmp_path: Path) -> None:
    main = write(tmp_path / "appliance.toml", '[receive]\nport = 104\nae_title = EDGE\n')
    with pytest.raises(ConfigError) as e:
        config.load(main)
    [p] = e.value.problems
    assert p.startswith(f"{main}: not valid TOML: ")
    assert "line 3" in p


def test_invalid_toml_in_several_files_all_listed(tmp_path: Path) -> None:
    main = write(tmp_path / "appliance.toml", "[receive\n")
    dropin = write(tmp_path / "conf.d" / "10.toml", "port = = 1\n")
    with pytest.raises(ConfigError) as e:
        config.load(main)
    assert [p.split(": ")[0] for p in e.value.problems] == [str(main), str(dropin)]
    assert all("line 1" in p for p in e.value.problems)


def test_missing_main_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        config.load(tmp_path / "nope.toml")


def test_main_file_that_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory"):
        config.load(tmp_path)


def test_non_utf8_file(tmp_path: Path) -> None:
    main = tmp_path / "appliance.toml"
    main.write_bytes(b'[appliance]\nname = "caf\xe9"\n')
    with pytest.raises(ConfigError, match=f"{re.escape(str(main))}: not valid"):
        config.load(main)


# --- through the CLI: exit 78 and the key on stderr ---------------------------------------


@pytest.fixture
def site(tmp_path: Path) -> dict[str, Any]:
    """A valid config (as the daemon tests use) with its keys created by `keys init`."""
    cfg = base_config(tmp_path, 11112)
    path = tmp_path / "appliance.toml"
    path.write_text(to_toml(cfg))
    cli("keys", "init", "--config", str(path), check=True)
    return cfg


def check(tmp_path: Path, cfg: dict[str, Any]) -> Any:
    path = tmp_path / "appliance.toml"
    path.write_text(to_toml(cfg))
    return cli("config", "check", "--config", str(path))


def test_cli_check_of_valid_config_exits_0(tmp_path: Path, site: dict[str, Any]) -> None:
    r = check(tmp_path, site)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""


def _dest(cfg: dict[str, Any], **kw: Any) -> dict[str, Any]:
    cfg["destinations"].append({"name": "pacs", "transport": "dicom", "host": "10.8.0.1",
                                "ae_title": "PACS", **kw})
    return cfg


CLI_CASES: list[tuple[str, Any, str]] = [
    ("unknown-top", lambda c: c.update(recieve={"port": 1}), "recieve: unknown key"),
    ("unknown-nested", lambda c: c["receive"].update(prot=1), "receive.prot: unknown key"),
    ("unknown-caller", lambda c: c["receive"]["callers"][0].update(host="1.2.3.4"),
     "receive.callers[0].host: unknown key"),
    ("unknown-destination", lambda c: c["destinations"][0].update(colour="red"),
     "destinations[0].colour: unknown key"),
    ("string-port", lambda c: c["receive"].update(port="104"),
     "receive.port: must be an integer, not a string"),
    ("int-bool", lambda c: c["receive"].update(accept_any_caller=1),
     "receive.accept_any_caller: must be true or false, not an integer"),
    ("port-range", lambda c: c["receive"].update(port=0), "receive.port: must be 1..65535"),
    ("duplicate-caller", lambda c: c["receive"]["callers"].append({"ae_title": "MODALITY"}),
     "receive.callers[1].ae_title: duplicate"),
    ("long-ae", lambda c: _dest(c, ae_title="P" * 17, plaintext=True),
     "destinations[1].ae_title: longer than 16 characters"),
    ("duplicate-destination", lambda c: c["destinations"].append(dict(c["destinations"][0])),
     "destinations[1].name: duplicate"),
    ("dicom-no-tls", lambda c: _dest(c), "destinations[1].tls: is required"),
    ("empty-callers", lambda c: c["receive"].update(callers=[]), "receive.callers: is empty"),
]


@pytest.mark.parametrize("mutate, expect", [pytest.param(m, e, id=i) for i, m, e in CLI_CASES])
def test_cli_check_reports_config_mistakes(tmp_path: Path, site: dict[str, Any], mutate: Any,
                                           expect: str) -> None:
    mutate(site)
    r = check(tmp_path, site)
    assert r.returncode == EX_CONFIG, r.stderr
    assert f"config error: {tmp_path / 'appliance.toml'}: {expect}" in r.stderr
    assert "Traceback" not in r.stderr
    assert r.stdout == ""


def test_cli_check_missing_key_file_names_spool_key_file(tmp_path: Path, site: dict[str, Any]) -> None:
    Path(site["spool"]["key_file"]).unlink()
    r = check(tmp_path, site)
    assert r.returncode == EX_CONFIG
    assert f"{tmp_path / 'appliance.toml'}: spool.key_file: key file" in r.stderr
    assert "does not exist" in r.stderr and "appliance keys init" in r.stderr


def test_cli_check_open_key_file_says_chmod(tmp_path: Path, site: dict[str, Any]) -> None:
    Path(site["spool"]["key_file"]).chmod(0o644)
    r = check(tmp_path, site)
    assert r.returncode == EX_CONFIG
    assert "spool.key_file: " in r.stderr and "chmod 600" in r.stderr


def test_cli_check_directory_destination_that_is_a_file(tmp_path: Path, site: dict[str, Any]) -> None:
    Path(site["destinations"][0]["path"]).write_text("not a folder")
    r = check(tmp_path, site)
    assert r.returncode == EX_CONFIG
    assert "destinations[0].path: " in r.stderr and "is not a directory" in r.stderr


def test_cli_check_names_the_dropin_that_set_a_missing_key_file(tmp_path: Path,
                                                                 site: dict[str, Any]) -> None:
    dropin = write(tmp_path / "conf.d" / "10-keys.toml", '[spool]\nkey_file = "missing.key"\n')
    r = check(tmp_path, site)
    assert r.returncode == EX_CONFIG
    assert f"config error: {dropin}: spool.key_file: key file {tmp_path / 'conf.d' / 'missing.key'}" \
        in r.stderr


def test_cli_check_lists_every_problem(tmp_path: Path, site: dict[str, Any]) -> None:
    site["receive"].update(port=0, accept_any_caller="no")
    site["pack"] = {"codec": "gif"}
    r = check(tmp_path, site)
    assert r.returncode == EX_CONFIG
    lines = r.stderr.splitlines()
    assert len(lines) == 3
    for key in ("receive.port", "receive.accept_any_caller", "pack.codec"):
        assert any(f": {key}: " in line for line in lines)


def test_cli_check_lists_every_file_problem(tmp_path: Path, site: dict[str, Any]) -> None:
    Path(site["spool"]["key_file"]).unlink()
    Path(site["encryption"]["appliance_key"]).chmod(0o640)
    Path(site["destinations"][0]["path"]).write_text("x")
    r = check(tmp_path, site)
    assert r.returncode == EX_CONFIG
    assert [line.split(": ")[2] for line in r.stderr.splitlines()] == [
        "spool.key_file", "encryption.appliance_key", "destinations[0].path"]


def test_cli_check_invalid_toml_gives_line(tmp_path: Path) -> None:
    path = write(tmp_path / "appliance.toml", "[receive]\nport = 104\nport = 105\n")
    r = cli("config", "check", "--config", str(path))
    assert r.returncode == EX_CONFIG
    assert f"{path}: not valid TOML" in r.stderr and "line 3" in r.stderr


# --- the example file -------------------------------------------------------------------


def test_example_parses(tmp_path: Path) -> None:
    main = tmp_path / "appliance.toml"
    shutil.copy(EXAMPLE, main)
    cfg = config.load(main)
    assert [d.transport for d in cfg.destinations] == ["dicom", "directory"]  # sftp: shown commented out
    assert cfg.receive.accept_any_caller is False and cfg.receive.callers


def test_example_passes_config_check_once_its_files_exist(tmp_path: Path) -> None:
    """With its absolute paths moved into a temp dir and the named files created, the
    example is a complete, working config: `config check` accepts it."""
    from appliance.core import crypto

    etc, var = tmp_path / "etc" / "appliance", tmp_path / "var"
    text = (EXAMPLE.read_text().replace("/etc/appliance", str(etc))
            .replace("/var/lib/appliance", str(var)).replace("/mnt/", f"{tmp_path}/mnt/"))
    assert "/etc/" not in text.replace(str(etc), "")
    main = write(etc / "appliance.toml", text)
    cfg = config.load(main)
    crypto.create_keypair(tmp_path / "center.key", cfg.encryption.recipients[0])
    dicom, _ = cfg.destinations
    assert dicom.tls
    for p in (dicom.tls.cert, dicom.tls.ca):
        write(p, "placeholder\n")
    write(dicom.tls.key, "placeholder\n").chmod(0o600)
    assert cli("keys", "init", "--config", str(main)).returncode == 0
    r = cli("config", "check", "--config", str(main))
    assert r.returncode == 0, r.stderr


def _dataclass_in(tp: Any) -> type | None:
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return tp
    for arg in typing.get_args(tp):
        found = _dataclass_in(arg)
        if found:
            return found
    return None


def config_keys() -> dict[str, Any]:
    """Every settable dotted key of the Config tree ('destinations.tls.cert'), with its
    dataclass default (or MISSING)."""
    keys: dict[str, Any] = {}

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.metadata.get("not_a_key"):
                continue
            path = f"{prefix}.{f.name}" if prefix else f.name
            keys[path] = f.default
            sub = _dataclass_in(hints[f.name])
            if sub is not None:
                walk(sub, path)
    walk(Config, "")
    return keys


_HEADER = re.compile(r"^#?\s*\[\[?\s*([a-z_.]+)\s*\]\]?\s*$")
_KEY = re.compile(r"^#?\s*([a-z_][a-z0-9_]*)\s*=")


def example_keys() -> dict[str, int]:
    """Dotted keys the example sets or shows commented out, with the line of the first."""
    found: dict[str, int] = {}
    section = ""
    for n, line in enumerate(EXAMPLE.read_text().splitlines()):
        if m := _HEADER.match(line):
            section = m.group(1)
            found.setdefault(section, n)
        elif m := _KEY.match(line):
            found.setdefault(f"{section}.{m.group(1)}" if section else m.group(1), n)
    return found


def _doc_above(lines: list[str], n: int) -> str:
    """The comment block that documents the key on line n (above it and any key or
    header lines directly above it)."""
    i = n - 1
    while i >= 0 and (_KEY.match(lines[i]) or _HEADER.match(lines[i])):
        i -= 1
    block = []
    while i >= 0 and lines[i].startswith("#") and not _KEY.match(lines[i]):
        block.append(lines[i])
        i -= 1
    return "\n".join(reversed(block))


def _toml_literal(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, str | Path):
        return f'"{v}"'
    return str(v)


def test_example_documents_every_config_key() -> None:
    """Docs cannot drift: every field of the dataclass tree is in the example, and the
    example names no key the code does not have."""
    code, doc = set(config_keys()), set(example_keys())
    assert code - doc == set(), "keys missing from config/appliance.example.toml"
    assert doc - code == set(), "keys in config/appliance.example.toml that the code lacks"


def test_example_explains_every_key_and_states_its_default() -> None:
    lines = EXAMPLE.read_text().splitlines()
    where = example_keys()
    keys = config_keys()
    tables = {k.rsplit(".", 1)[0] for k in keys if "." in k}
    for key, default in keys.items():
        if key in tables:
            continue  # a [table] header; its keys carry the explanations
        doc = _doc_above(lines, where[key])
        assert len(doc) > 20, f"{key} has no explanation above it"
        if default is not dataclasses.MISSING and isinstance(default, bool | int | float | str | Path):
            assert _toml_literal(default) in doc, f"{key}: default {default!r} not stated"


def test_every_dataclass_in_config_is_reachable_from_config() -> None:
    """A new settings table, in any module of the config package, must hang off Config,
    or the drift test would not see it."""
    reached: set[type] = {Config}

    def walk(cls: type) -> None:
        for tp in typing.get_type_hints(cls).values():
            sub = _dataclass_in(tp)
            if sub and sub not in reached:
                reached.add(sub)
                walk(sub)
    walk(Config)
    modules = [config, *(importlib.import_module(f"{config.__name__}.{m.name}")
                         for m in pkgutil.iter_modules(config.__path__))]
    defined = {v for mod in modules for v in vars(mod).values()
               if isinstance(v, type) and dataclasses.is_dataclass(v) and v.__module__ == mod.__name__}
    assert defined == reached


def test_dev_config_parses(tmp_path: Path) -> None:
    """The dev config shipped in the repo parses too (paths need not exist)."""
    dev = tmp_path / "dev.toml"
    shutil.copy(REPO / "config" / "appliance.dev.toml", dev)
    assert config.load(dev).receive.accept_any_caller is True



def test_an_sftp_destination_takes_link_timeout_s() -> None:
    assert parse(with_(destinations=[SFTP])).destinations[0].link_timeout_s == 6.0
    cfg = parse(with_(destinations=[{**SFTP, "link_timeout_s": 12}]))
    assert cfg.destinations[0].link_timeout_s == 12.0
