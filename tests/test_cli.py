"""The `appliance` command line, run as the technician runs it (a subprocess).

What it promises: one line on stderr per error and a documented exit code, never a
traceback; `config check` prints the effective values with secrets elided; `keys init`
creates what is missing and never replaces a key.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance import __version__
from appliance.cli import main
from appliance.core import config, crypto
from appliance.core.errors import EX_CANTCREAT, EX_CONFIG, EX_SOFTWARE, EX_UNAVAILABLE, EX_USAGE
from tests.peers import REPO, base_config, cli, free_port, to_toml


@pytest.fixture
def site(tmp_path: Path) -> dict[str, Any]:
    """A valid config written to tmp_path/appliance.toml (keys not created yet)."""
    cfg = base_config(tmp_path, 11112)
    write_config(tmp_path, cfg)
    return cfg


def write_config(root: Path, cfg: dict[str, Any]) -> str:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "appliance.toml"
    path.write_text(to_toml(cfg))
    return str(path)


def assert_one_line_error(r: Any) -> None:
    assert "Traceback" not in r.stderr
    assert len(r.stderr.splitlines()) == 1, r.stderr
    assert r.stderr.startswith("error: ")


# --- version and usage ------------------------------------------------------------------


def test_version() -> None:
    r = cli("--version")
    assert r.returncode == 0
    assert r.stdout.strip() == f"appliance {__version__}"


def test_help_exits_0() -> None:
    r = cli("--help")
    assert r.returncode == 0 and "config" in r.stdout and r.stderr == ""


@pytest.mark.parametrize("argv", [
    pytest.param(["frobnicate"], id="unknown-command"),
    pytest.param(["config", "lint"], id="unknown-subcommand"),
    pytest.param(["config", "check", "--bogus"], id="unknown-option"),
    pytest.param(["status", "extra"], id="extra-argument"),
    pytest.param(["keys", "init", "--config"], id="option-without-value"),
])
def test_usage_error_exits_64_with_one_line(argv: list[str]) -> None:
    r = cli(*argv)
    assert r.returncode == EX_USAGE, r.stderr
    assert_one_line_error(r)
    assert r.stdout == ""


@pytest.mark.parametrize(("argv", "commands"), [
    pytest.param([], ["run", "config", "keys", "queue", "bundle", "status", "echo", "diagnostics", "ingest",
                      "audit", "forward", "destination", "log-level", "vpn", "update",
                      "update-gate", "update-fetch", "update-install", "fleet"], id="bare"),
    pytest.param(["vpn"], ["render"], id="vpn"),
    pytest.param(["forward"], ["pause", "resume"], id="forward"),
    pytest.param(["destination"], ["off", "on"], id="destination"),
    pytest.param(["audit"], ["show"], id="audit"),
    pytest.param(["fleet"], ["ca", "sign", "crl", "keys", "send", "status", "serve", "config"], id="fleet"),
    pytest.param(["fleet", "config"], ["push"], id="fleet-config"),
    pytest.param(["fleet", "ca"], ["init", "center"], id="fleet-ca"),
    pytest.param(["fleet", "keys"], ["init"], id="fleet-keys"),
    pytest.param(["config"], ["check", "systemd-dropin", "import"], id="config"),
    pytest.param(["keys"], ["init", "show"], id="keys"),
    pytest.param(["queue"], ["list", "show", "hold", "release", "retry", "delete"], id="queue"),
    pytest.param(["bundle"], ["inspect", "extract"], id="bundle"),
])
def test_a_missing_command_prints_the_help_of_that_level_and_exits_64(
        argv: list[str], commands: list[str]) -> None:
    r = cli(*argv)
    assert r.returncode == EX_USAGE
    assert r.stdout == ""
    assert r.stderr.startswith(f"usage: {' '.join(['appliance', *argv])} ")
    # a command's line is indented 4; a help text wrapped below a long name, further
    listed = [line.split()[0] for line in r.stderr.splitlines()
              if line.startswith("    ") and not line.startswith("     ")]
    assert listed == commands
    assert "cmd" not in r.stderr.split() and "sub" not in r.stderr.split()


# --- config check -----------------------------------------------------------------------


def add_sftp(root: Path, cfg: dict[str, Any], passphrase: str) -> None:
    key, known = root / "keys" / "sftp_ed25519", root / "keys" / "known_hosts"
    cfg["destinations"].append({"name": "center", "transport": "sftp", "host": "upload.example",
                                "user": "edge", "key": str(key), "key_passphrase": passphrase,
                                "known_hosts": str(known)})
    key.parent.mkdir(parents=True, exist_ok=True)
    key.write_text("placeholder\n")
    key.chmod(0o600)
    known.write_text("placeholder\n")


def test_config_check_prints_effective_values(tmp_path: Path, site: dict[str, Any]) -> None:
    path = write_config(tmp_path, site)
    assert cli("keys", "init", "--config", path).returncode == 0
    r = cli("config", "check", "--config", path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert f'sources = ["{path}"]' in lines
    assert "receive.port = 11112" in lines
    assert 'receive.callers[0].ae_title = "MODALITY"' in lines
    assert "receive.accept_any_caller = false" in lines
    assert "pack.verify = true" in lines  # a default, shown because it is in effect


def test_config_check_never_prints_a_secret(tmp_path: Path, site: dict[str, Any]) -> None:
    # (secrets elided in printed values: test_config.py)
    assert cli("keys", "init", "--config", write_config(tmp_path, site)).returncode == 0
    add_sftp(tmp_path, site, "correct-horse-battery")
    path = write_config(tmp_path, site)
    for args in (("config", "check"), ("config", "check", "--json")):
        r = cli(*args, "--config", path)
        assert "correct-horse-battery" not in r.stdout + r.stderr


def test_config_check_shows_only_fields_of_the_transport(tmp_path: Path, site: dict[str, Any]) -> None:
    path = write_config(tmp_path, site)
    assert cli("keys", "init", "--config", path).returncode == 0
    r = cli("config", "check", "--config", path)
    assert r.returncode == 0, r.stderr
    dest = sorted(line.split(" = ")[0] for line in r.stdout.splitlines()
                  if line.startswith("destinations[0]."))
    assert dest == ["destinations[0].max_kbit_s", "destinations[0].mode", "destinations[0].name",
                    "destinations[0].path", "destinations[0].transport"]  # max_kbit_s, mode: any transport


def test_config_check_json(tmp_path: Path, site: dict[str, Any]) -> None:
    path = write_config(tmp_path, site)
    cli("keys", "init", "--config", path, check=True)
    r = cli("config", "check", "--json", "--config", path)
    assert r.returncode == 0, r.stderr
    eff = json.loads(r.stdout)
    assert eff["destinations"][0] == {"name": "outbox", "transport": "directory",
                                      "path": site["destinations"][0]["path"], "max_kbit_s": 0.0,
                                      "mode": "failover"}
    assert eff["receive"]["callers"] == [{"ae_title": "MODALITY", "hosts": []}]


def test_config_check_before_keys_init_names_the_key_files(tmp_path: Path, site: dict[str, Any]) -> None:
    path = write_config(tmp_path, site)
    r = cli("config", "check", "--config", path)
    assert r.returncode == EX_CONFIG
    keys = [line.split(": ")[2] for line in r.stderr.splitlines()]
    assert keys == ["spool.key_file", "encryption.appliance_key", "encryption.appliance_public_key"]
    assert "appliance keys init" in r.stderr
    assert r.stdout == ""


def test_config_check_missing_file(tmp_path: Path) -> None:
    r = cli("config", "check", "--config", str(tmp_path / "nope.toml"))
    assert r.returncode == EX_CONFIG
    assert r.stderr.strip() == f"config error: {tmp_path / 'nope.toml'}: file not found"


# --- keys init --------------------------------------------------------------------------


def key_files(cfg: dict[str, Any]) -> list[Path]:
    return [Path(cfg["spool"]["key_file"]), Path(cfg["encryption"]["appliance_key"]),
            Path(cfg["encryption"]["appliance_public_key"])]


def test_keys_init_is_idempotent(tmp_path: Path, site: dict[str, Any]) -> None:
    path = write_config(tmp_path, site)
    first = cli("keys", "init", "--config", path)
    assert first.returncode == 0, first.stderr
    assert first.stdout.count("created") == 2
    files = key_files(site)
    before = [p.read_bytes() for p in files]
    second = cli("keys", "init", "--config", path)
    assert second.returncode == 0, second.stderr
    assert "created" not in second.stdout and second.stdout.count("kept") == 2
    assert [p.read_bytes() for p in files] == before
    for p in files[:2]:
        assert stat.S_IMODE(p.stat().st_mode) == 0o600


def test_keys_init_writes_a_lost_public_key_again(tmp_path: Path, site: dict[str, Any]) -> None:
    path = write_config(tmp_path, site)
    cli("keys", "init", "--config", path, check=True)
    pub = Path(site["encryption"]["appliance_public_key"])
    before = pub.read_bytes()
    pub.unlink()
    r = cli("keys", "init", "--config", path)
    assert r.returncode == 0, r.stderr
    assert pub.read_bytes() == before


def test_keys_init_refuses_public_key_without_private(tmp_path: Path, site: dict[str, Any]) -> None:
    path = write_config(tmp_path, site)
    cli("keys", "init", "--config", path, check=True)
    Path(site["encryption"]["appliance_key"]).unlink()
    pub = Path(site["encryption"]["appliance_public_key"])
    before = pub.read_bytes()
    r = cli("keys", "init", "--config", path)
    assert r.returncode == EX_CONFIG
    assert_one_line_error(r)
    assert "move it aside" in r.stderr
    assert pub.read_bytes() == before


def test_keys_init_refuses_an_open_key_and_leaves_it(tmp_path: Path, site: dict[str, Any]) -> None:
    path = write_config(tmp_path, site)
    cli("keys", "init", "--config", path, check=True)
    spool_key = Path(site["spool"]["key_file"])
    before = spool_key.read_bytes()
    spool_key.chmod(0o644)
    r = cli("keys", "init", "--config", path)
    assert r.returncode == EX_CONFIG
    assert_one_line_error(r)
    assert "chmod 600" in r.stderr
    assert spool_key.read_bytes() == before


def test_keys_init_with_bad_config_creates_nothing(tmp_path: Path, site: dict[str, Any]) -> None:
    site["receive"]["port"] = 0
    path = write_config(tmp_path, site)
    r = cli("keys", "init", "--config", path)
    assert r.returncode == EX_CONFIG
    assert "receive.port: must be 1..65535" in r.stderr
    assert not any(p.exists() for p in key_files(site))


# --- status and queue before the daemon ---------------------------------------------------


def test_status_without_daemon_exits_69(tmp_path: Path, site: dict[str, Any]) -> None:
    r = cli("status", "--config", write_config(tmp_path, site))
    assert r.returncode == EX_UNAVAILABLE
    assert_one_line_error(r)
    assert "not running" in r.stderr


def test_status_json_without_daemon_is_json_and_exits_69(tmp_path: Path, site: dict[str, Any]) -> None:
    r = cli("status", "--json", "--config", write_config(tmp_path, site))
    assert r.returncode == EX_UNAVAILABLE
    d = json.loads(r.stdout)
    assert d["running"] is False and "not running" in d["error"]
    assert r.stderr == ""


def test_status_json_with_a_bad_config_is_json_and_exits_78(tmp_path: Path, site: dict[str, Any]) -> None:
    site["receive"]["port"] = 0
    path = write_config(tmp_path, site)
    r = cli("status", "--json", "--config", path)
    assert r.returncode == EX_CONFIG
    d = json.loads(r.stdout)
    assert d["running"] is None
    assert d["problems"] == [f"{path}: receive.port: must be 1..65535"]


def test_status_json_of_a_running_daemon_says_running(appliance_factory: Callable[..., Any]) -> None:
    app = appliance_factory()
    r = cli("status", "--json", "--config", str(app.config_path))
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["running"] is True and d["pid"] == app.proc.pid


def test_status_shows_the_boxs_identity_after_the_counters(appliance_factory: Callable[..., Any]) -> None:
    app = appliance_factory()
    r = cli("status", "--config", str(app.config_path))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    first = lines.index("identity       box name: test-appliance")
    assert all(line.startswith("identity       ") for line in lines[first:]), lines
    key = re.compile(r"identity       appliance key \(X25519\) sha256: [0-9a-f ]{79}")
    assert any(key.fullmatch(line) for line in lines[first:]), lines


def test_status_with_stale_socket_exits_69(tmp_path: Path, site: dict[str, Any]) -> None:
    """A socket file left behind by a killed daemon: nobody listens on it."""
    sock_path = Path(site["appliance"]["state_dir"]) / "run" / "control.sock"
    sock_path.parent.mkdir(parents=True)
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(sock_path))
    r = cli("status", "--config", write_config(tmp_path, site))
    assert r.returncode == EX_UNAVAILABLE
    assert_one_line_error(r)
    assert "not running" in r.stderr


def test_queue_list_before_any_run_says_so(tmp_path: Path, site: dict[str, Any]) -> None:
    r = cli("queue", "list", "--config", write_config(tmp_path, site))
    assert r.returncode == EX_CANTCREAT
    assert_one_line_error(r)
    assert "no queue index" in r.stderr and "has the appliance run" in r.stderr


def queue_with_items(site: dict[str, Any], n: int, created: float | None = None) -> list[str]:
    """A queue index holding n ready segments (rows as the spool writes them), oldest
    first; their ids. `created` defaults to n minutes ago for the first, one minute apart."""
    from appliance.queue.index import open_index

    state = Path(site["appliance"]["state_dir"])
    state.mkdir(exist_ok=True)
    idx = open_index(state)
    start = time.time() - 60 * n if created is None else created
    ids = [f"{i:024x}" for i in range(n)]
    with idx.tx() as c:
        for i, item_id in enumerate(ids):
            c.execute("INSERT INTO segments(id, study_key, state, created, updated, instances,"
                      " bytes) VALUES (?, ?, 'ready', ?, ?, 3, 1000)",
                      (item_id, "5d41402abc4b2a76", start + 60 * i, start + 60 * i))
    idx.close()
    return ids


def test_output_into_a_closed_pipe_ends_quietly(tmp_path: Path, site: dict[str, Any]) -> None:
    """`appliance queue list | head`: the reader has gone; no message, exit 141 as for SIGPIPE."""
    path = write_config(tmp_path, site)
    queue_with_items(site, 2000)  # more than a pipe buffer holds
    r, w = os.pipe()
    os.close(r)  # the reader is gone before the first write
    try:
        p = subprocess.run([sys.executable, "-m", "appliance", "queue", "list", "--config", path],
                           stdout=w, stderr=subprocess.PIPE, text=True, timeout=60, cwd=REPO)
    finally:
        os.close(w)
    assert p.stderr == ""
    assert p.returncode == 141


def test_queue_list_of_an_empty_queue(tmp_path: Path, site: dict[str, Any]) -> None:
    from appliance.queue.index import open_index

    path = write_config(tmp_path, site)
    state = Path(site["appliance"]["state_dir"])
    state.mkdir()
    open_index(state).close()
    r = cli("queue", "list", "--config", path)
    assert r.returncode == 0, r.stderr
    assert "the queue is empty" in r.stdout
    r = cli("queue", "list", "--json", "--config", path)
    assert r.returncode == 0 and json.loads(r.stdout) == []


# --- times: local ISO-8601 with the offset, and an age ---------------------------------

# A fixed offset with no tzdata needed: POSIX "XYZ+3:30" is UTC-03:30.
TZ_ENV, TZ_OFFSET = "XYZ+3:30", datetime.timezone(-datetime.timedelta(hours=3, minutes=30))


def iso(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, TZ_OFFSET).isoformat(timespec="seconds")


def show_lines(stdout: str) -> dict[str, str]:
    return {k: v.strip() for k, _, v in (line.partition(" ") for line in stdout.splitlines())}


def test_queue_show_prints_local_times_with_offset_and_age(
        tmp_path: Path, site: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", TZ_ENV)
    path = write_config(tmp_path, site)
    created = time.time() - 180
    (item_id,) = queue_with_items(site, 1, created=created)
    r = cli("queue", "show", item_id, "--config", path)
    assert r.returncode == 0, r.stderr
    fields = show_lines(r.stdout)
    assert fields["created"] == f"{iso(created)} (3m ago)"
    assert fields["created"].split(" ")[0].endswith("-03:30")
    assert fields["next_attempt"] == "-"  # never scheduled: not 1970


def test_queue_show_json_keeps_numbers_and_adds_iso_strings(
        tmp_path: Path, site: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", TZ_ENV)
    path = write_config(tmp_path, site)
    created = time.time() - 180
    (item_id,) = queue_with_items(site, 1, created=created)
    r = cli("queue", "show", item_id, "--json", "--config", path)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["created"] == pytest.approx(created)
    assert d["created_iso"] == iso(created)
    assert d["next_attempt"] == 0 and d["next_attempt_iso"] is None


def write_bundle(path: Path, recipient: Path, created: int) -> Path:
    """A one-instance bundle for `recipient` (a PEM public key), made at `created`."""
    from appliance.bundle.format import BundleWriter, InstanceInfo

    data = b"not an image, the format does not care"
    with path.open("wb") as f:
        w = BundleWriter(f, "b0cafe", [crypto.load_public_key(recipient)], "5d41402abc4b2a76",
                         created=created)
        w.begin_instance(InstanceInfo(
            sop_instance_uid="1.2.3.4", sop_class="1.2.840.10008.5.1.4.1.1.7",
            transfer_syntax="1.2.840.10008.1.2.1", received_transfer_syntax="1.2.840.10008.1.2.1",
            received_size=len(data), received_sha256=hashlib.sha256(data).hexdigest(),
            action="passthrough"))
        w.write(data)
        w.end_instance()
        w.close()
    return path


def test_bundle_inspect_prints_the_creation_time_with_offset_and_age(
        tmp_path: Path, site: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", TZ_ENV)
    cli("keys", "init", "--config", write_config(tmp_path, site), check=True)
    created = int(time.time()) - 2 * 3600
    bundle = write_bundle(tmp_path / "x.bundle", Path(site["encryption"]["appliance_public_key"]),
                          created)
    r = cli("bundle", "inspect", str(bundle))
    assert r.returncode == 0, r.stderr
    assert show_lines(r.stdout)["created"] == f"{iso(created)} (2.0h ago)"


def test_bundle_inspect_json_keeps_the_number_and_adds_an_iso_string(
        tmp_path: Path, site: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", TZ_ENV)
    cli("keys", "init", "--config", write_config(tmp_path, site), check=True)
    created = int(time.time()) - 2 * 3600
    bundle = write_bundle(tmp_path / "x.bundle", Path(site["encryption"]["appliance_public_key"]),
                          created)
    r = cli("bundle", "inspect", "--json", str(bundle))
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert (d["created"], d["created_iso"]) == (created, iso(created))


# --- bundle commands take --config, and the config's key -------------------------------


def site_bundle(tmp_path: Path, site: dict[str, Any]) -> tuple[str, Path]:
    """(config path, a bundle sealed for the site's appliance key, keys created)."""
    path = write_config(tmp_path, site)
    cli("keys", "init", "--config", path, check=True)
    pub = Path(site["encryption"]["appliance_public_key"])
    return path, write_bundle(tmp_path / "x.bundle", pub, int(time.time()))


def test_bundle_extract_takes_its_key_from_config(tmp_path: Path, site: dict[str, Any]) -> None:
    path, bundle = site_bundle(tmp_path, site)
    r = cli("bundle", "extract", str(bundle), "--config", path, "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"1 instances written to {tmp_path / 'out'}"
    assert (tmp_path / "out" / "0.dcm").read_bytes() == b"not an image, the format does not care"


def test_bundle_inspect_with_config_shows_the_manifest(tmp_path: Path, site: dict[str, Any]) -> None:
    path, bundle = site_bundle(tmp_path, site)
    r = cli("bundle", "inspect", str(bundle), "--config", path, "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["study"] == "5d41402abc4b2a76" and len(d["instances"]) == 1


def test_bundle_inspect_uses_the_default_config_when_it_exists(
        run_main: Callable[..., tuple[int, str, str]], monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path, site: dict[str, Any]) -> None:
    path, bundle = site_bundle(tmp_path, site)
    monkeypatch.setattr(config, "DEFAULT_CONFIG", Path(path))
    rc, out, err = run_main("bundle", "inspect", str(bundle), "--json")
    assert rc == 0, err
    assert json.loads(out)["study"] == "5d41402abc4b2a76"


def test_bundle_inspect_of_another_box_bundle_shows_its_header(
        tmp_path: Path, site: dict[str, Any]) -> None:
    """The config's key was not asked for: a bundle it cannot open still shows its header."""
    path, _ = site_bundle(tmp_path, site)
    other = base_config(tmp_path / "other", 11112)
    cli("keys", "init", "--config", write_config(tmp_path / "other", other), check=True)
    bundle = write_bundle(tmp_path / "y.bundle", Path(other["encryption"]["appliance_public_key"]),
                          int(time.time()))
    r = cli("bundle", "inspect", str(bundle), "--config", path)
    assert r.returncode == 0, r.stderr
    fields = show_lines(r.stdout)
    assert fields["bundle_id"] == "b0cafe"
    assert fields["manifest"] == (f"not shown: encryption.appliance_key "
                                  f"({site['encryption']['appliance_key']}) is not a recipient")


def test_bundle_extract_without_key_or_config_is_a_usage_error(
        run_main: Callable[..., tuple[int, str, str]], monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    monkeypatch.setattr(config, "DEFAULT_CONFIG", tmp_path / "absent.toml")
    rc, out, err = run_main("bundle", "extract", str(tmp_path / "x.bundle"), "--out", str(tmp_path))
    assert rc == EX_USAGE
    assert err.startswith("error: appliance bundle extract: give --key, or --config")


# --- the top-level handler, in process ---------------------------------------------------


@pytest.fixture
def run_main(capsys: pytest.CaptureFixture[str]) -> Iterator[Callable[..., tuple[int, str, str]]]:
    """Call cli.main in this process (it sets the umask: put it back afterwards)."""
    old = os.umask(0o022)
    os.umask(old)

    def run(*argv: str) -> tuple[int, str, str]:
        rc = main(list(argv))
        out = capsys.readouterr()
        return rc, out.out, out.err

    yield run
    os.umask(old)


def test_unexpected_exception_is_one_line_and_70(run_main: Callable[..., tuple[int, str, str]],
                                                  monkeypatch: pytest.MonkeyPatch, site: Any,
                                                  tmp_path: Path) -> None:
    def boom(path: Path | None = None) -> config.Config:
        raise RuntimeError("DOE^JANE 1.2.840.99")  # what a careless bug might carry

    monkeypatch.delenv("APPLIANCE_DEBUG", raising=False)
    monkeypatch.setattr(config, "load", boom)
    rc, out, err = run_main("config", "check", "--config", str(tmp_path / "appliance.toml"))
    assert rc == EX_SOFTWARE
    assert err.splitlines() == ["error: unexpected RuntimeError; rerun with APPLIANCE_DEBUG=1 for details"]
    assert "DOE" not in err and out == ""


def test_broken_pipe_not_on_stdout_is_still_a_bug(run_main: Callable[..., tuple[int, str, str]],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Only a closed stdout ends quietly; EPIPE from anything else is reported."""
    def boom(path: Path | None = None) -> config.Config:
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.delenv("APPLIANCE_DEBUG", raising=False)
    monkeypatch.setattr(config, "load", boom)
    rc, out, err = run_main("config", "check")
    assert rc == EX_SOFTWARE
    assert err.splitlines() == ["error: unexpected BrokenPipeError; rerun with APPLIANCE_DEBUG=1 for details"]


def test_unexpected_exception_raises_under_appliance_debug(
        run_main: Callable[..., tuple[int, str, str]], monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(path: Path | None = None) -> config.Config:
        raise RuntimeError("bug")

    monkeypatch.setenv("APPLIANCE_DEBUG", "1")
    monkeypatch.setattr(config, "load", boom)
    with pytest.raises(RuntimeError, match="bug"):
        run_main("config", "check")


def test_status_daemon_not_answering_exits_69(run_main: Callable[..., tuple[int, str, str]],
                                              tmp_path: Path, site: dict[str, Any]) -> None:
    """A daemon that accepts on its control socket but never answers (hung): 69, one line."""
    sock_path = Path(site["appliance"]["state_dir"]) / "run" / "control.sock"
    sock_path.parent.mkdir(parents=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as hung:
        hung.bind(str(sock_path))
        hung.listen(1)  # never accepted, never answered
        rc, out, err = run_main("status", "--config", str(tmp_path / "appliance.toml"))
    assert rc == EX_UNAVAILABLE
    assert err.splitlines() == [f"error: the appliance daemon did not answer on {sock_path}"]


def test_status_json_daemon_not_answering_is_json_and_exits_69(
        run_main: Callable[..., tuple[int, str, str]], tmp_path: Path, site: dict[str, Any]) -> None:
    sock_path = Path(site["appliance"]["state_dir"]) / "run" / "control.sock"
    sock_path.parent.mkdir(parents=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as hung:
        hung.bind(str(sock_path))
        hung.listen(1)  # never accepted, never answered
        rc, out, err = run_main("status", "--json", "--config", str(tmp_path / "appliance.toml"))
    assert rc == EX_UNAVAILABLE and err == ""
    assert json.loads(out) == {"running": None,
                               "error": f"the appliance daemon did not answer on {sock_path}"}


def test_config_error_lines_in_process(run_main: Callable[..., tuple[int, str, str]],
                                       tmp_path: Path, site: dict[str, Any]) -> None:
    site["receive"]["port"] = "104"
    path = write_config(tmp_path, site)
    rc, out, err = run_main("config", "check", "--config", path)
    assert rc == EX_CONFIG
    assert err == f"config error: {path}: receive.port: must be an integer, not a string\n"


# --- things the config parser cannot see, which config check and run must report --------


def test_state_dir_longer_than_a_unix_socket_path(tmp_path: Path) -> None:
    """A state_dir whose control socket path is longer than sun_path's 107 bytes (a pytest
    temp dir on a busy CI machine, a deep mount): check passes, the daemon starts, and
    status reaches it through an O_PATH descriptor of the socket's folder."""
    root = tmp_path / ("d" * 90)
    root.mkdir()
    port = free_port()
    cfg = base_config(root, port)
    path = write_config(root, cfg)
    assert len(os.fsencode(root / "state" / "run" / "control.sock")) > 107
    assert cli("keys", "init", "--config", path).returncode == 0
    r = cli("config", "check", "--config", path)
    assert r.returncode == 0, r.stderr
    log = root / "daemon.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "appliance", "run", "--config", str(path)],
                                stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 30
        while True:
            r = cli("status", "--json", "--config", path)
            if r.returncode == 0:
                break
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, r.stderr
            time.sleep(0.2)
        d = json.loads(r.stdout)
        assert d["running"] is True and d["pid"] == proc.pid
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0, log.read_text()


def test_sftp_destination_is_asked_for_its_keys(tmp_path: Path) -> None:
    """sftp is available: a block naming it is asked for its required keys."""
    cfg = base_config(tmp_path, 11112)
    cfg["destinations"] = [{"name": "center", "transport": "sftp"}]
    r = cli("config", "check", "--config", write_config(tmp_path, cfg))
    assert r.returncode == EX_CONFIG
    assert [line.split(": ", 3)[2] for line in r.stderr.splitlines()] == [
        "destinations[0].host", "destinations[0].user", "destinations[0].key",
        "destinations[0].known_hosts"]


def sftp_site(root: Path, site: dict[str, Any], known_hosts_line: str) -> str:
    """The site config with an sftp destination on port 2222, its key made by ssh-keygen
    and a known_hosts file holding `known_hosts_line`; keys initialised."""
    key, known = root / "keys" / "sftp_ed25519", root / "keys" / "known_hosts"
    key.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True,
                   capture_output=True, timeout=60)
    known.write_text(known_hosts_line)
    site["destinations"] = [{"name": "center", "transport": "sftp", "host": "upload.example",
                             "port": 2222, "user": "edge", "key": str(key), "known_hosts": str(known)}]
    path = write_config(root, site)
    cli("keys", "init", "--config", path, check=True)
    return path


def test_config_check_accepts_a_known_hosts_file_that_pins_the_server(tmp_path: Path,
                                                                      site: dict[str, Any]) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "host")],
                   check=True, capture_output=True, timeout=60)
    kind, blob = (tmp_path / "host.pub").read_text().split()[:2]
    line = f"[upload.example]:2222 {kind} {blob}\n"
    r = cli("config", "check", "--config", sftp_site(tmp_path, site, line))
    assert r.returncode == 0, r.stderr


def test_config_check_refuses_a_known_hosts_file_without_the_server(tmp_path: Path,
                                                                    site: dict[str, Any]) -> None:
    """The line is for port 22; the destination's port is 2222."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "host")],
                   check=True, capture_output=True, timeout=60)
    kind, blob = (tmp_path / "host.pub").read_text().split()[:2]
    r = cli("config", "check", "--config", sftp_site(tmp_path, site, f"upload.example {kind} {blob}\n"))
    assert r.returncode == EX_CONFIG
    assert [line.split(": ", 3)[2:] for line in r.stderr.splitlines()] == [
        ["destinations[0].known_hosts", f"{tmp_path / 'keys' / 'known_hosts'} has no key for"
         " [upload.example]:2222 (for a port other than 22 a line starts with [host]:port)"]]


# --- the README says what the commands show ---------------------------------------------


def test_readme_explains_every_state_queue_list_shows() -> None:
    from appliance.queue.state import STATES

    readme = (REPO / "README.md").read_text()
    explained = re.findall(r"^\| `(\w+)` \| ", readme, re.M)
    assert explained == list(STATES)
