"""`appliance config import SRC` on the host (appliance/cli/config_import.py): a folder
stands for the mounted APPLCONFIG stick, a temp dir for /data/config. What the image's
unit does around it (mount, restart, unmount) is tests/test_image_config.py's."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest

from appliance.cli import main
from appliance.core import config
from appliance.ops import pki
from tests.peers import base_config, to_toml


@pytest.fixture
def box(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The box's /data/config (config.SITE_CONFIG_DIR points at it); its keys are in tmp_path/keys."""
    d = tmp_path / "data-config"
    monkeypatch.setattr(config, "SITE_CONFIG_DIR", d)
    monkeypatch.setattr(config, "DEFAULT_CONFIG", tmp_path / "etc" / "appliance.toml")
    return d


def site(tmp_path: Path, name: str = "site-box", **receive: Any) -> dict[str, Any]:
    cfg = base_config(tmp_path, 11112, **receive)
    cfg["appliance"]["name"] = name
    return cfg


def stick(tmp_path: Path, cfg: dict[str, Any] | str, label: str = "stick") -> Path:
    s = tmp_path / label
    s.mkdir(exist_ok=True)
    (s / "appliance.toml").write_text(cfg if isinstance(cfg, str) else to_toml(cfg))
    return s


def run_import(src: Path, box: Path, *extra: str) -> int:
    return main(["config", "import", str(src), "--config-dir", str(box), *extra])


def result(src: Path) -> str:
    return (src / "appliance-result.txt").read_bytes().decode()


def in_force(box: Path) -> config.Config:
    assert config.default_path() == box / "current" / "appliance.toml"
    return config.load()


def test_import_installs_a_valid_config_under_the_config_dir(tmp_path: Path, box: Path) -> None:
    src = stick(tmp_path, site(tmp_path))
    marker = tmp_path / "changed"
    assert run_import(src, box, "--changed-marker", str(marker)) == 0
    assert in_force(box).appliance.name == "site-box"
    assert marker.exists()
    text = result(src)
    assert text.startswith("appliance config import: INSTALLED\r\n")
    assert "config check: ok" in text and "box name: site-box" in text
    assert re.search(r"appliance key \(X25519\) sha256: ([0-9a-f]{4} ){15}[0-9a-f]{4}\r\n", text), text


def test_import_makes_the_keys_the_new_config_names(tmp_path: Path, box: Path) -> None:
    src = stick(tmp_path, site(tmp_path))
    assert run_import(src, box) == 0
    assert (tmp_path / "keys" / "spool.key").is_file() and (tmp_path / "keys" / "appliance.pub").is_file()


def test_import_audits_the_keys_it_made_and_not_those_it_kept(tmp_path: Path, box: Path) -> None:
    """On the image's first boot the import runs before appliance-keys.service, which then
    finds every key made: the import's own record is the only one of their creation."""
    from appliance.audit.trail import FILE, read
    from appliance.core import crypto

    cfg = site(tmp_path)
    assert run_import(stick(tmp_path, cfg), box) == 0
    assert run_import(stick(tmp_path, site(tmp_path, name="renamed-box"), label="again"), box) == 0
    key = crypto.load_spool_key(tmp_path / "keys" / "spool.key").audit_key()
    trail = Path(cfg["appliance"]["state_dir"]) / "audit" / FILE
    made = [m for m in read(trail, key) if m is not None and b"keys created: " in m]
    assert len(made) == 1, made  # the second import kept them all
    assert b"spool key: " in made[0] and b"appliance key: " in made[0]


def test_import_refuses_a_broken_config_and_keeps_the_one_in_force(tmp_path: Path, box: Path) -> None:
    assert run_import(stick(tmp_path, site(tmp_path)), box) == 0
    bad = site(tmp_path, name="broken-box")
    bad["receive"]["port"] = 99999
    src = stick(tmp_path, bad, "bad-stick")
    marker = tmp_path / "changed"
    assert run_import(src, box, "--changed-marker", str(marker)) == 78
    assert in_force(box).appliance.name == "site-box"
    assert not marker.exists()
    text = result(src)
    assert text.startswith("appliance config import: REFUSED\r\n")
    line = r"^config check: appliance\.toml: receive\.port: must be 1\.\.65535\r$"
    assert re.search(line, text, re.M), text
    assert "box name: site-box" in text  # the identity of the config that stays in force
    assert not [p for p in box.iterdir() if p.name.startswith("site-") and '"broken-box"' in
                (p / "appliance.toml").read_text()]


def test_import_refuses_toml_that_does_not_parse_and_names_the_file(tmp_path: Path, box: Path) -> None:
    src = stick(tmp_path, "[receive\nport = 104\n")
    assert run_import(src, box) == 78
    assert re.search(r"^config check: appliance\.toml: not valid TOML", result(src), re.M), result(src)
    assert not (box / "current").exists()


def test_import_of_the_config_in_force_is_unchanged(tmp_path: Path, box: Path) -> None:
    src = stick(tmp_path, site(tmp_path))
    assert run_import(src, box) == 0
    (src / "appliance-result.txt").unlink()
    marker = tmp_path / "changed"
    assert run_import(src, box, "--changed-marker", str(marker)) == 0
    assert result(src).startswith("appliance config import: UNCHANGED\r\n")
    assert not marker.exists()


def test_import_does_not_undo_a_later_config_with_files_it_imported_before(tmp_path: Path, box: Path) -> None:
    """The APPLCONFIG partition is read at every boot: its files, imported once, must not
    replace what a stick installed since; deleting its result file imports them again."""
    partition = stick(tmp_path, site(tmp_path, name="first"), "partition")
    assert run_import(partition, box) == 0
    assert run_import(stick(tmp_path, site(tmp_path, name="second")), box) == 0
    assert run_import(partition, box) == 0
    assert result(partition).startswith("appliance config import: ALREADY IMPORTED\r\n")
    assert in_force(box).appliance.name == "second"
    (partition / "appliance-result.txt").unlink()
    assert run_import(partition, box) == 0
    assert in_force(box).appliance.name == "first"


def test_import_reads_conf_d_drop_ins_from_the_stick(tmp_path: Path, box: Path) -> None:
    src = stick(tmp_path, site(tmp_path))
    (src / "conf.d").mkdir()
    (src / "conf.d" / "10-ae.toml").write_text('[receive]\nae_title = "SITEAE"\n')
    assert run_import(src, box) == 0
    assert in_force(box).receive.ae_title == "SITEAE"
    assert "files: appliance.toml, conf.d/10-ae.toml" in result(src)


def test_import_ignores_files_it_does_not_expect(tmp_path: Path, box: Path) -> None:
    src = stick(tmp_path, site(tmp_path))
    (src / "run-me.sh").write_text("#!/bin/sh\n")
    (src / "conf.d").mkdir()
    (src / "conf.d" / "notes.txt").write_text("x")
    (src / "conf.d" / "._10-mac.toml").write_text("garbage")  # macOS's resource forks
    assert run_import(src, box) == 0
    installed = {str(p.relative_to(box / "current")) for p in (box / "current").rglob("*") if p.is_file()}
    assert installed == {"appliance.toml"}


def test_import_refuses_a_symlink_on_the_stick(tmp_path: Path, box: Path) -> None:
    src = tmp_path / "stick"
    src.mkdir()
    (tmp_path / "elsewhere.toml").write_text(to_toml(site(tmp_path)))
    (src / "appliance.toml").symlink_to(tmp_path / "elsewhere.toml")
    assert run_import(src, box) == 65
    assert "config check: appliance.toml is a symbolic link" in result(src)
    assert not (box / "current").exists()


def test_import_refuses_a_file_over_the_size_limit(tmp_path: Path, box: Path) -> None:
    src = stick(tmp_path, to_toml(site(tmp_path)) + "#" * (64 << 10) + "\n")
    assert run_import(src, box) == 65
    assert re.search(r"config check: appliance\.toml is \d+ bytes \(at most 65536\)", result(src))


def test_import_refuses_a_drop_in_name_it_would_not_read_back(tmp_path: Path, box: Path) -> None:
    src = stick(tmp_path, site(tmp_path))
    (src / "conf.d").mkdir()
    (src / "conf.d" / "10-SITE.TOML").write_text('[receive]\nae_title = "X"\n')
    assert run_import(src, box) == 65
    assert "conf.d/'10-SITE.TOML'" in result(src)


def test_import_refuses_a_private_key_in_certs(tmp_path: Path, box: Path) -> None:
    src = stick(tmp_path, site(tmp_path))
    (src / "certs").mkdir()
    (src / "certs" / "box.pem").write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    assert run_import(src, box) == 65
    assert "certs/box.pem holds a private key" in result(src)


def test_import_with_no_appliance_toml_installs_nothing(tmp_path: Path, box: Path) -> None:
    src = tmp_path / "partition"
    src.mkdir()
    (src / "README.txt").write_text("the APPLCONFIG partition\n")
    assert run_import(src, box) == 0
    assert result(src).startswith("appliance config import: NOTHING TO IMPORT\r\n")
    assert not (box / "current").exists()


def test_import_keeps_the_previous_set_and_removes_older_ones(tmp_path: Path, box: Path) -> None:
    for name in ("one", "two", "three"):
        assert run_import(stick(tmp_path, site(tmp_path, name=name), name), box) == 0
    sets = sorted(p.name for p in box.iterdir() if p.name.startswith("site-"))
    assert sorted([os.readlink(box / "current"), os.readlink(box / "previous")]) == sets
    assert config.load(box / "previous" / "appliance.toml").appliance.name == "two"


def test_default_config_is_the_image_default_until_a_site_config_is_installed(
        tmp_path: Path, box: Path) -> None:
    assert config.default_path() == config.DEFAULT_CONFIG
    assert run_import(stick(tmp_path, site(tmp_path)), box) == 0
    assert config.default_path() == box / "current" / "appliance.toml"


def test_import_carries_the_ops_csr_and_then_installs_the_signed_certificate(
        tmp_path: Path, box: Path) -> None:
    """Enrollment without a keyboard: the first stick's config names a certificate the box
    does not have yet, so it is refused, but the box made its ops key and the result file
    carries the CSR (also as box.csr); signed, the certificate comes back on the stick in
    certs/ and the config is installed."""
    ca = tmp_path / "fleet-ca"
    pki.ca_init(ca, ("127.0.0.1",))
    cfg = site(tmp_path, name="box-7")
    cfg["operations"] = {"host": "127.0.0.1", "ca": "certs/ca.pem", "cert": "certs/box.pem",
                         "key": str(tmp_path / "keys" / "mqtt.key")}
    src = stick(tmp_path, cfg)
    (src / "certs").mkdir()
    (src / "certs" / "ca.pem").write_bytes((ca / "ca.pem").read_bytes())
    assert run_import(src, box) == 78
    text = result(src)
    assert re.search(r"^config check: appliance\.toml: operations\.cert: ", text, re.M), text
    csr = (src / "box.csr").read_text()
    assert csr.startswith("-----BEGIN CERTIFICATE REQUEST-----") and csr.replace("\n", "\r\n") in text
    assert main(["fleet", "sign", str(src / "box.csr"), "--ca", str(ca), "--out",
                 str(src / "certs" / "box.pem")]) == 0
    assert run_import(src, box) == 0, result(src)
    assert in_force(box).operations is not None
    assert "ops link certificate: installed" in result(src)
    assert (box / "current" / "certs" / "box.pem").read_bytes() == (src / "certs" / "box.pem").read_bytes()


def test_keys_show_prints_the_fingerprint_of_the_appliance_public_key(
        tmp_path: Path, box: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import hashlib

    from cryptography.hazmat.primitives import serialization

    from appliance.core import crypto

    main_file = tmp_path / "appliance.toml"
    main_file.write_text(to_toml(site(tmp_path)))
    assert main(["keys", "init", "--config", str(main_file)]) == 0
    capsys.readouterr()
    assert main(["keys", "show", "--config", str(main_file)]) == 0
    out = capsys.readouterr().out
    der = crypto.load_public_key(tmp_path / "keys" / "appliance.pub").public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    shown = re.search(r"appliance key \(X25519\) sha256: (.*)", out)
    assert shown and shown.group(1).replace(" ", "") == hashlib.sha256(der).hexdigest()
    assert "box name: site-box" in out and "software version: " in out


def test_identity_names_the_slot_from_the_kernel_command_line(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from appliance.cli import identity

    cmdline = tmp_path / "cmdline"
    cmdline.write_text("BOOT_IMAGE=/vmlinuz root=PARTUUID=x ro rauc.slot=B console=ttyS0\n")
    monkeypatch.setattr(identity, "CMDLINE", cmdline)
    assert identity.slot() == "B"
    cmdline.write_text("root=PARTUUID=x ro\n")
    assert identity.slot().startswith("unknown")


# --- the operations center's remote drop-in (ops/desired.py) across an import ----------

REMOTE = '[receive]\nae_title = "REMOTE"\n'


def remote_in_force(box: Path, text: str = REMOTE, version: int = 4) -> Path:
    """A remote drop-in as the daemon leaves it once applied: config-dir/remote.d."""
    from appliance.ops import desired

    ps = desired.paths_in(box / config.REMOTE_DIR)
    ps.dropin.parent.mkdir(parents=True, exist_ok=True)
    ps.dropin.write_text(text)
    ps.applied.write_text(f'{{"version": {version}, "digest": "d{version}", "at": 1}}')
    return ps.dropin


def test_an_import_keeps_the_remote_dropin_and_it_still_wins(tmp_path: Path, box: Path) -> None:
    assert run_import(stick(tmp_path, site(tmp_path)), box) == 0
    dropin = remote_in_force(box)
    assert config.remote_dir(config.default_path()) == box / "remote.d"
    src = stick(tmp_path, site(tmp_path, ae_title="STICK"), "second")
    assert run_import(src, box) == 0
    cfg = in_force(box)
    assert dropin.read_text() == REMOTE
    assert (cfg.receive.ae_title, cfg.file_of("receive.ae_title")) == ("REMOTE", dropin)


def test_the_result_file_names_the_kept_remote_dropin_its_version_keys_and_how_to_clear_it(
        tmp_path: Path, box: Path) -> None:
    assert run_import(stick(tmp_path, site(tmp_path)), box) == 0
    dropin = remote_in_force(box, version=4)
    src = stick(tmp_path, site(tmp_path, ae_title="STICK"), "second")
    assert run_import(src, box) == 0
    text = result(src)
    assert f"remote config (operations center): {dropin} (version 4 applied); it is kept by an import" \
           " and wins over these files for: receive.ae_title\r\n" in text, text
    assert "remote config: to remove it, import a stick with clear-remote-config.txt beside" \
           " appliance.toml\r\n" in text


def test_an_import_checks_the_new_files_with_the_remote_dropin_and_refuses_a_clash(
        tmp_path: Path, box: Path) -> None:
    assert run_import(stick(tmp_path, site(tmp_path)), box) == 0
    # valid with the set in force (no bandwidth cap); the new set caps its destination
    # below the floor the center set
    remote_in_force(box, "[queue]\nmin_rate_kbit_s = 100\n")
    new = site(tmp_path, ae_title="STICK")
    new["destinations"][0]["max_kbit_s"] = 50
    src = stick(tmp_path, new, "second")
    assert run_import(src, box) == 78
    text = result(src)
    assert re.search(r"^config check: appliance\.toml: destinations\[0\]\.max_kbit_s: is below"
                     r" queue\.min_rate_kbit_s \(100\)", text, re.M), text
    assert "put clear-remote-config.txt beside appliance.toml" in text
    assert in_force(box).receive.ae_title == "EDGE"  # nothing changed


def test_a_stick_with_clear_remote_config_removes_the_remote_dropin_once(tmp_path: Path, box: Path) -> None:
    from appliance.ops import desired

    assert run_import(stick(tmp_path, site(tmp_path)), box) == 0
    dropin = remote_in_force(box, version=4)
    src = stick(tmp_path, site(tmp_path, ae_title="STICK"), "clearing")
    (src / "clear-remote-config.txt").write_text("")
    marker = tmp_path / "changed"
    assert run_import(src, box, "--changed-marker", str(marker)) == 0
    assert marker.exists() and not dropin.exists()
    assert in_force(box).receive.ae_title == "STICK"
    text = result(src)
    assert "remote config: cleared (version 4)\r\n" in text and \
           "remote config (operations center): none\r\n" in text, text
    st = desired.status(config.default_path())
    assert (st["version"], st["cleared"]) == (4, 4)  # v4 is not taken again, only a newer one


def test_a_clear_that_cannot_write_says_not_cleared_and_the_set_is_still_installed(
        tmp_path: Path, box: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from appliance.ops import desired

    assert run_import(stick(tmp_path, site(tmp_path)), box) == 0
    dropin = remote_in_force(box)

    def read_only(folder: Path, now: float | None = None) -> int | None:
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(desired, "clear", read_only)
    src = stick(tmp_path, site(tmp_path, ae_title="STICK"), "clearing")
    (src / "clear-remote-config.txt").write_text("")
    assert run_import(src, box) == 0
    assert f"remote config: NOT cleared ({box / 'remote.d'} cannot be written: Permission denied)\r\n" \
        in result(src)
    assert dropin.exists() and in_force(box).receive.ae_title == "REMOTE"
