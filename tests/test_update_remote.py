"""The operations center's `update` command (update/fetch.py, update/remote.py).

The fetch against real servers on loopback: an HTTPS server (tests/bundle_server.py,
certificates from openssl) that cuts its first answer mid-way, and OpenSSH's SFTP
(tests/sshd.py) behind a relay that cuts the connection mid-download. The command end to
end in process (ops/commands.py with a signed envelope, the Runner, the worker as a real
subprocess) with RAUC replaced the way tests/test_update_rauc.py replaces it: a stand-in
`rauc` script, found first on PATH. What only QEMU proves (RAUC really writing the slot,
the reboot through the update lock, the gate on the new slot) is in tests/test_image_update.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.audit import AuditTrail
from appliance.core import config
from appliance.ops import commands
from appliance.update import fetch, remote
from tests.bundle_server import BundleServer
from tests.peers import base_config, cli, to_toml, wait_for
from tests.sshd import REMOTE_DIR, Relay, Sshd, keygen

DATA = os.urandom(3 << 20) + b"end"
SHA = hashlib.sha256(DATA).hexdigest()
SOURCES = ("https://127.0.0.1:8443/updates/", "sftp://root@127.0.0.1:2222/drop/")


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fetch, "PAUSE_S", 0.05)


# --- which URLs a command may name ----------------------------------------------------------

@pytest.mark.parametrize(("url", "ok"), [
    ("https://127.0.0.1:8443/updates/update.raucb", True),
    ("https://127.0.0.1:8443/updates/2026/update.raucb", True),
    ("sftp://root@127.0.0.1:2222/drop/update.raucb", True),
    ("https://127.0.0.1:8444/updates/update.raucb", False),  # another port
    ("https://10.0.0.9:8443/updates/update.raucb", False),  # another host
    ("http://127.0.0.1:8443/updates/update.raucb", False),  # another scheme
    ("sftp://other@127.0.0.1:2222/drop/update.raucb", False),  # another user
    ("https://127.0.0.1:8443/updates-x/update.raucb", False),  # a sibling of the folder
    ("https://127.0.0.1:8443/updates/../etc/shadow", False),
    ("https://127.0.0.1:8443/updates/%2e%2e/etc/shadow", False),
    ("https://127.0.0.1:8443/updates/update.raucb?x=1", False),
    ("https://u:p@127.0.0.1:8443/updates/update.raucb", False),
    ("https://127.0.0.1:8443/updates/", False),  # the folder itself
])
def test_only_urls_under_a_configured_source_are_allowed(url: str, ok: bool) -> None:
    assert fetch.allowed(url, SOURCES) is ok


# --- the fetch against real servers ----------------------------------------------------------

def test_https_fetch_cut_midway_resumes_from_the_bytes_on_disk(tmp_path: Path) -> None:
    with BundleServer(tmp_path, DATA, cut_after=1 << 20) as srv:
        got = fetch.fetch(srv.url, SHA, tmp_path / "dl", fetch.Where(tls=srv.client_context()),
                          max_bytes=8 << 20, deadline_s=120)
    assert got.read_bytes() == DATA and got.name == f"{SHA}.raucb"
    assert srv.ranges == [None, f"bytes={1 << 20}-"]
    assert sorted(p.name for p in got.parent.iterdir()) == [got.name]


def test_server_that_cannot_resume_is_read_again_from_the_start(tmp_path: Path) -> None:
    with BundleServer(tmp_path, DATA, cut_after=1 << 20, ranges=False) as srv:
        got = fetch.fetch(srv.url, SHA, tmp_path / "dl", fetch.Where(tls=srv.client_context()),
                          max_bytes=8 << 20, deadline_s=120)
    assert got.read_bytes() == DATA and len(srv.ranges) == 2


def test_wrong_sha256_is_refused_and_the_download_removed(tmp_path: Path) -> None:
    with BundleServer(tmp_path, DATA) as srv, pytest.raises(fetch.FetchError) as e:
        fetch.fetch(srv.url, "0" * 64, tmp_path / "dl", fetch.Where(tls=srv.client_context()),
                    max_bytes=8 << 20, deadline_s=120)
    assert e.value.reason == "sha256 mismatch"
    assert list((tmp_path / "dl").iterdir()) == []


def test_bundle_declared_larger_than_the_cap_is_refused_before_its_body(tmp_path: Path) -> None:
    with BundleServer(tmp_path, DATA) as srv, pytest.raises(fetch.FetchError) as e:
        fetch.fetch(srv.url, SHA, tmp_path / "dl", fetch.Where(tls=srv.client_context()),
                    max_bytes=1 << 20, deadline_s=120)
    assert e.value.reason == "too big"
    assert not (tmp_path / "dl" / f"{SHA}.raucb.part").exists() or \
        (tmp_path / "dl" / f"{SHA}.raucb.part").stat().st_size == 0


def test_server_certificate_not_from_the_configured_ca_is_refused_at_once(tmp_path: Path) -> None:
    with BundleServer(tmp_path, DATA) as srv, pytest.raises(fetch.FetchError) as e:
        fetch.fetch(srv.url, SHA, tmp_path / "dl", fetch.Where(), max_bytes=8 << 20, deadline_s=120)
    assert (e.value.reason, e.value.retry, srv.ranges) == ("refused", False, [])


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[Sshd]:
    with Sshd(tmp_path / "sshd") as server:
        (server.drop / "update.raucb").write_bytes(DATA)
        yield server


def test_sftp_fetch_cut_midway_resumes_from_the_bytes_on_disk(tmp_path: Path, sshd: Sshd) -> None:
    with Relay(sshd.port) as relay:
        known = tmp_path / "known_hosts"
        known.write_text(sshd.known_hosts_line().replace(f":{sshd.port} ", f":{relay.port} "))
        seen: list[tuple[int, int]] = []

        def progress(have: int, total: int | None) -> None:
            seen.append((have, relay.cuts))
            if have >= 1 << 20 and not relay.cuts and relay.cut_after is None:
                relay.cut_after = relay.sent  # the link dies once 1 MiB is on disk
        got = fetch.fetch(f"sftp://root@127.0.0.1:{relay.port}{REMOTE_DIR}/update.raucb", SHA,
                          tmp_path / "dl", fetch.Where(ssh_key=sshd.client_key, known_hosts=known),
                          max_bytes=8 << 20, deadline_s=120, progress=progress)
    assert got.read_bytes() == DATA and relay.cuts == 1
    assert {c for _, c in seen} == {0, 1}  # bytes came before the cut and after it
    assert [h for h, _ in seen] == sorted(h for h, _ in seen)  # resumed, never read again from 0


def test_sftp_server_with_another_host_key_is_refused(tmp_path: Path, sshd: Sshd) -> None:
    other = keygen(tmp_path / "other_host")  # a key the server does not have
    known = tmp_path / "known_hosts"
    known.write_text(sshd.known_hosts_line(other.with_suffix(".pub")))
    with pytest.raises(fetch.FetchError) as e:
        fetch.fetch(f"sftp://root@127.0.0.1:{sshd.port}{REMOTE_DIR}/update.raucb", SHA, tmp_path / "dl",
                    fetch.Where(ssh_key=sshd.client_key, known_hosts=known), max_bytes=8 << 20,
                    deadline_s=60)
    assert e.value.reason == "host key"


# --- the command, end to end in process ----------------------------------------------------

BOX = "update-box"


def fake_rauc(d: Path, refuse: bool = False) -> Path:
    """A `rauc` answering info (version 2.0), status (B boots next) and install (or refusing)."""
    d.mkdir(parents=True, exist_ok=True)
    status = {"booted": "A", "boot_primary": "rootfs.1", "slots": [
        {"rootfs.0": {"bootname": "A", "slot_status": {"bundle": {"version": "1.0"}}}},
        {"rootfs.1": {"bootname": "B", "slot_status": {"bundle": {"version": "2.0"}}}}]}
    (d / "status.json").write_text(json.dumps(status))
    fail = "echo 'signature verification failed: unable to get local issuer certificate' >&2; exit 1"
    install = fail if refuse else 'test -s "$2" || exit 1'
    script = d / "rauc"
    script.write_text(f"""#!/bin/sh
echo "$@" >> {d}/args
case "$1" in
  info) echo '{{"compatible": "teleradiology-edge-appliance/x86_64", "version": "2.0"}}';;
  status) cat {d}/status.json;;
  install) {install};;
esac
""")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return d


class Center:
    """A box's Commands with the Runner as its `update.start` handler, and the events."""

    def __init__(self, tmp_path: Path, sources: list[str], extra: dict[str, Any] | None = None) -> None:
        doc = base_config(tmp_path, 11112)
        doc["update"] = {"sources": sources, "deadline_s": 120, **(extra or {})}
        self.config_path = tmp_path / "appliance.toml"
        self.config_path.write_text(to_toml(doc))
        cli("keys", "init", "--config", str(self.config_path), check=True)
        self.cfg = config.load(self.config_path)
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.runner = remote.Runner(self.cfg, emit=lambda kind, **kw: self.events.append((kind, kw)))
        self.key = Ed25519PrivateKey.generate()
        self.seen = commands.Seen(tmp_path / "cmdstate")
        trail = AuditTrail(tmp_path / "audit", BOX, "EDGE", bytes(range(32)), 1 << 20, 2)
        self.cmds = commands.Commands(BOX, {commands.key_id(self.key.public_key()): self.key.public_key()},
                                      self.seen, {"update.start": self.runner.start}, trail,
                                      summary=lambda s: s, synced=lambda: True)

    def send(self, args: dict[str, Any]) -> dict[str, Any]:
        import time

        env = commands.envelope(commands.body(BOX, "update", args, self.key, now=time.time()), self.key)
        return self.cmds.handle(f"appliance/{BOX}/cmd", env)

    def outcome(self) -> tuple[str, dict[str, Any]]:
        wait_for(lambda: any(k in remote.FINAL for k, _ in self.events) and not self.runner.running(),
                 timeout=120, what="the update's outcome", detail=lambda: repr(self.events))
        return next((k, f) for k, f in self.events if k in remote.FINAL)


@pytest.fixture
def box(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """(make_center, rauc dir): the worker finds the stand-in rauc first on PATH and writes
    its trial record in the temp dir."""
    yield from centers(tmp_path, monkeypatch)


def centers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The `box` fixture's body (tests/test_update_handoff.py uses it too)."""
    rauc_dir = tmp_path / "bin"
    monkeypatch.setenv("PATH", f"{rauc_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("APPLIANCE_UPDATE_TRIAL", str(tmp_path / "data" / "trial.json"))
    made: list[Center] = []

    def make(sources: list[str], refuse: bool = False, **extra: Any) -> Center:
        fake_rauc(rauc_dir, refuse)
        c = Center(tmp_path, sources, extra)
        made.append(c)
        return c
    yield make, rauc_dir
    for c in made:
        if c.runner.running():
            c.outcome()
        c.seen.close()


def test_update_command_fetches_the_bundle_and_installs_it_with_rauc(tmp_path: Path, box: Any) -> None:
    make, rauc_dir = box
    with BundleServer(tmp_path / "srv", DATA) as srv:
        c = make([srv.url.rsplit("/", 1)[0] + "/"], ca=str(srv.ca))
        res = c.send({"url": srv.url, "sha256": SHA, "reboot": False})
        assert (res["code"], res["result"]) == (200, {"accepted": True})
        kind, fields = c.outcome()
    assert (kind, fields) == ("update.installed", {"cmd_id": res["cmd_id"], "bundle_version": "2.0",
                                                   "slot": "B", "reboot": False})
    kinds = [k for k, _ in c.events]
    assert kinds[0] == "update.accepted" and "update.fetched" in kinds and "update.progress" in kinds
    dl = c.cfg.appliance.state_dir / "update"
    assert f"install {dl / SHA}.raucb" in (rauc_dir / "args").read_text()
    assert not (dl / f"{SHA}.raucb").exists()  # removed once in the slot
    trial = json.loads((tmp_path / "data" / "trial.json").read_text())
    assert (trial["slot"], trial["version"], trial["spool_failures"]) == ("B", "2.0", 0)


def test_update_command_with_a_wrong_sha256_installs_nothing(tmp_path: Path, box: Any) -> None:
    make, rauc_dir = box
    with BundleServer(tmp_path / "srv", DATA) as srv:
        c = make([srv.url.rsplit("/", 1)[0] + "/"], ca=str(srv.ca))
        assert c.send({"url": srv.url, "sha256": "1" * 64, "reboot": False})["code"] == 200
        assert c.outcome() == ("update.failed", {"cmd_id": c.events[0][1]["cmd_id"],
                                                 "reason": "sha256 mismatch"})
    assert not (rauc_dir / "args").exists()  # RAUC never asked
    assert not (tmp_path / "data" / "trial.json").exists()


def test_update_command_for_a_url_outside_the_sources_is_forbidden(tmp_path: Path, box: Any) -> None:
    make, _ = box
    c = make(["https://127.0.0.1:1/updates/"])
    res = c.send({"url": "https://127.0.0.1:1/elsewhere/update.raucb", "sha256": SHA})
    assert (res["code"], res["ok"]) == (403, False)
    assert c.events == [] and not c.runner.running()


def test_bundle_rauc_refuses_is_reported_and_removed(tmp_path: Path, box: Any) -> None:
    make, rauc_dir = box
    with BundleServer(tmp_path / "srv", DATA) as srv:
        c = make([srv.url.rsplit("/", 1)[0] + "/"], refuse=True, ca=str(srv.ca))
        c.send({"url": srv.url, "sha256": SHA, "reboot": False})
        kind, fields = c.outcome()
    assert (kind, fields["reason"]) == ("update.refused", "rauc refused")
    assert not (c.cfg.appliance.state_dir / "update" / f"{SHA}.raucb").exists()
    assert not (tmp_path / "data" / "trial.json").exists()


def test_update_command_without_an_update_table_is_refused(tmp_path: Path, box: Any) -> None:
    make, _ = box
    c = make(["https://127.0.0.1:1/updates/"])
    c.runner.cfg = dataclasses.replace(c.cfg, update=None)
    res = c.send({"url": "https://127.0.0.1:1/updates/u.raucb", "sha256": SHA})
    assert res["code"] == 422 and "[update]" in res["detail"]


# --- [update] in the config -----------------------------------------------------------------

def _parse_update(update: Any) -> config.Config:
    return config.parse({"receive": {"callers": [{"ae_title": "CT"}]}, "update": update}, {},
                        Path("/etc/appliance/appliance.toml"))


def _update_problems(update: Any) -> list[str]:
    with pytest.raises(config.ConfigError) as e:
        _parse_update(update)
    return e.value.problems


def test_update_table_defaults() -> None:
    u = _parse_update({"sources": ["https://10.8.0.1/updates/"]}).update
    assert u is not None and (u.max_mb, u.deadline_s, u.download_dir, u.ca) == (2048, 3600.0, None, None)


@pytest.mark.parametrize(("update", "key", "says"), [
    ({}, "update.sources", "is required"),
    ({"sources": []}, "update.sources", "array of 1..32"),
    ({"sources": ["http://10.8.0.1/updates/"]}, "update.sources", "https:// or sftp://"),
    ({"sources": ["https://10.8.0.1/updates"]}, "update.sources", "ending in '/'"),
    ({"sources": ["https://10.8.0.1/a/../b/"]}, "update.sources", "without '..'"),
    ({"sources": ["sftp://10.8.0.1/updates/"]}, "update.sources", "names its user"),
    ({"sources": ["https://u:pw@10.8.0.1/updates/"]}, "update.sources", "neither a password"),
    ({"sources": ["sftp://u@10.8.0.1/updates/"], "known_hosts": "/k/kh"}, "update.ssh_key",
     "required with an sftp:// source"),
    ({"sources": ["https://10.8.0.1/updates/"], "max_mb": 8}, "update.max_mb", "16..16384"),
    ({"sources": ["https://10.8.0.1/updates/"], "deadline_s": 10}, "update.deadline_s", "60..86400"),
    ({"sources": ["https://10.8.0.1/updates/"], "url": "x"}, "update.url", "unknown key"),
])
def test_update_table_mistakes_name_their_key(update: dict[str, Any], key: str, says: str) -> None:
    ps = _update_problems(update)
    assert len(ps) == 1 and key in ps[0] and says in ps[0], ps


def test_update_command_while_an_update_waits_to_reboot_is_refused(tmp_path: Path, box: Any) -> None:
    from appliance.update import lock

    make, _ = box
    c = make(["https://127.0.0.1:1/updates/"])
    c.cfg.appliance.state_dir.mkdir(parents=True, exist_ok=True)
    held = lock.exclusive(lock.path_in(c.cfg.appliance.state_dir), 5)  # `appliance update` rebooting
    assert held is not None
    try:
        res = c.send({"url": "https://127.0.0.1:1/updates/u.raucb", "sha256": SHA})
    finally:
        for fd in held:
            os.close(fd)
    assert res["code"] == 422 and "about to reboot" in res["detail"] and not c.runner.running()


def _gone(pid: int) -> bool:
    return not Path(f"/proc/{pid}").exists()


def test_stop_ends_a_worker_whose_download_hangs_and_reports_it_interrupted(tmp_path: Path, box: Any) -> None:
    """Runner.stop (the daemon's stop): the worker's process group is ended within the
    grace, the outcome is `update.failed` `interrupted`, once, the `.part` is kept for a
    later command to resume, and no new command starts a worker."""
    make, _ = box
    with BundleServer(tmp_path / "srv", DATA, stall_after=1 << 20) as srv:
        c = make([srv.url.rsplit("/", 1)[0] + "/"], ca=str(srv.ca))
        res = c.send({"url": srv.url, "sha256": SHA, "reboot": False})
        part = c.cfg.appliance.state_dir / "update" / f"{SHA}.raucb.part"
        wait_for(lambda: part.exists() and part.stat().st_size >= 1 << 20, 60, "the download stalled")
        assert c.runner._proc is not None
        pid = c.runner._proc.pid
        t0 = time.monotonic()
        c.runner.stop()
        assert time.monotonic() - t0 < remote.TERM_GRACE_S + 1 and _gone(pid)
        assert [(k, f) for k, f in c.events if k in remote.FINAL] == \
            [("update.failed", {"cmd_id": res["cmd_id"], "reason": "interrupted"})]
        assert part.stat().st_size >= 1 << 20
        again = c.send({"url": srv.url, "sha256": SHA, "reboot": False})
    assert again["code"] == 422 and "stopping" in again["detail"] and not c.runner.running()


def test_stop_kills_a_worker_that_ignores_sigterm_within_its_bound(tmp_path: Path, box: Any,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker (and its child) that ignore SIGTERM: SIGKILL after TERM_GRACE_S; the stop
    returns within TERM_GRACE_S + 2 * KILL_WAIT_S and reports the update interrupted."""
    make, _ = box
    c = make(["https://127.0.0.1:1/updates/"])
    stubborn = tmp_path / "stubborn"
    stubborn.write_text("#!/bin/sh\ntrap '' TERM\nsleep 120\n")  # argv ignored; sleep inherits it
    stubborn.chmod(0o755)
    monkeypatch.setattr(remote.sys, "executable", str(stubborn))  # what Runner.start runs
    res = c.send({"url": "https://127.0.0.1:1/updates/u.raucb", "sha256": SHA})
    assert res["code"] == 200
    assert c.runner._proc is not None
    pid = c.runner._proc.pid
    children = wait_for(lambda: Path(f"/proc/{pid}/task/{pid}/children").read_text().split(), 10,
                        "the worker's child")
    t0 = time.monotonic()
    c.runner.stop()
    took = time.monotonic() - t0
    assert remote.TERM_GRACE_S <= took < remote.TERM_GRACE_S + 2 * remote.KILL_WAIT_S
    assert _gone(pid) and wait_for(lambda: all(_gone(int(p)) for p in children), 5, "its child gone")
    assert [(k, f) for k, f in c.events if k in remote.FINAL] == \
        [("update.failed", {"cmd_id": res["cmd_id"], "reason": "interrupted"})]


def test_a_worker_mark_left_at_start_is_reported_once_and_a_reused_pid_is_not_killed(
        tmp_path: Path, box: Any) -> None:
    """recover() finds the mark of a worker an earlier daemon never reported: the command
    is reported `interrupted`, once; the PID it names now belongs to another program,
    which is left alone."""
    import subprocess

    make, _ = box
    c = make(["https://127.0.0.1:1/updates/"])
    other = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        c.runner._mark("0123456789abcdef", other.pid)  # as Runner.start leaves it
        c.runner.recover()
        c.runner.recover()  # a second start: nothing left
        assert other.poll() is None
    finally:
        other.kill()
        other.wait(10)
    assert [(k, f) for k, f in c.events if k in remote.FINAL] == \
        [("update.failed", {"cmd_id": "0123456789abcdef", "reason": "interrupted"})]
    assert not (c.cfg.appliance.state_dir / "update" / remote.MARK_NAME).exists()
