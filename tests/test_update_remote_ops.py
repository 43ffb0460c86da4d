"""The `update` command through the whole path: `appliance fleet send` at the center, a
real Mosquitto, a real daemon, its worker fetching from a real HTTPS server on loopback,
and RAUC replaced by the stand-in `rauc` of tests/test_update_remote.py (first on the
daemon's PATH). The outcome is read where the ops link sends it from: the daemon's
outbox of ops events (STATE/ops/outbox.db)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.bundle_server import BundleServer
from tests.mosquitto import MOSQUITTO, Broker, fleet_ca, ops_section, sign
from tests.peers import Appliance, base_config, cli, free_port, wait_for
from tests.test_update_remote import DATA, SHA, fake_rauc

BOX = "update-ops-box"
pytestmark = [pytest.mark.ops, pytest.mark.peers,
              pytest.mark.skipif(not Path(MOSQUITTO).exists(), reason="mosquitto not installed (make peers)")]


class Site:
    def __init__(self, root: Path, ca: Path, broker: Broker, box: Appliance, srv: BundleServer) -> None:
        self.root, self.ca, self.broker, self.box, self.srv = root, ca, broker, box, srv

    def ping(self) -> None:
        answers_ping(self.root, self.ca, self.broker, self.box)

    def send(self, *args: str) -> tuple[int, dict[str, Any]]:
        r = cli("fleet", "send", BOX, "update", *args, "--key", str(self.root / "center" / "command.key"),
                "--ca", str(self.ca), "--port", str(self.broker.port), "--timeout", "30")
        return r.returncode, json.loads(r.stdout) if r.stdout.strip() else {"stderr": r.stderr}

    def events(self) -> list[dict[str, Any]]:
        db = sqlite3.connect(f"file:{self.box.state_dir / 'ops' / 'outbox.db'}?mode=ro", uri=True)
        try:
            return [json.loads(b) for (b,) in db.execute("SELECT body FROM events ORDER BY seq")]
        finally:
            db.close()

    def outcome(self, cmd_id: str) -> dict[str, Any]:
        def final() -> dict[str, Any] | None:
            return next((e for e in self.events() if e.get("cmd_id") == cmd_id and e["kind"] in
                         ("update.installed", "update.refused", "update.failed")), None)
        got = wait_for(final, 120, "the update's outcome event", detail=self.box.log_text)
        assert got is not None
        return got


def workers(box: Appliance) -> list[int]:
    """The PIDs of the box's `update-fetch` workers (each leads its own session)."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                argv = (d / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"update-fetch" in argv and str(box.config_path).encode() in argv:
                found.append(int(d.name))
    return found


def answers_ping(root: Path, ca: Path, broker: Broker, box: Appliance) -> None:
    wait_for(lambda: cli("fleet", "send", BOX, "ping", "--key", str(root / "center" / "command.key"),
                         "--ca", str(ca), "--port", str(broker.port), "--timeout", "20").returncode == 0,
             60, "the box answers a ping", detail=box.log_text)


@contextlib.contextmanager
def update_site(root: Path, stall_after: int | None = None,
                **env: str) -> Iterator[tuple[Path, Broker, Appliance, BundleServer]]:
    """A fleet CA and center keys, a real Mosquitto, a bundle server on loopback (that
    stalls after `stall_after` bytes) and a box whose `[update] sources` name it, with the
    stand-in `rauc` first on its PATH (`env`: more of the box's environment); (ca, broker,
    box, server) once the box answers a ping. Everything is stopped on exit, also when the
    start fails."""
    ca = fleet_ca(root / "ca")
    cli("fleet", "keys", "init", str(root / "center"), check=True)
    broker = Broker(root / "broker", ca).start()
    srv = BundleServer(root / "srv", DATA, stall_after=stall_after).__enter__()
    box: Appliance | None = None
    try:
        cfg = base_config(root / "box", free_port())
        cfg["appliance"]["name"] = BOX
        cfg["operations"] = ops_section(root / "box", broker, ca, root / "center")
        cfg["update"] = {"sources": [srv.url.rsplit("/", 1)[0] + "/"], "ca": str(srv.ca), "deadline_s": 120}
        box = Appliance(root / "box", cfg)
        sign(ca, root / "box" / "keys" / "mqtt.csr")
        fake_rauc(root / "bin")
        box.env.update({"APPLIANCE_CLOCK_SYNCED": "1", "PATH": f"{root / 'bin'}:{os.environ['PATH']}",
                        "APPLIANCE_UPDATE_TRIAL": str(root / "data" / "trial.json"), **env})
        box.start()
        answers_ping(root, ca, broker, box)
        yield ca, broker, box, srv
    finally:
        if box is not None:
            box.stop()
            box.kill9()
        broker.stop()
        srv.close()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("update-ops")
    with update_site(root) as (ca, broker, box, srv):
        yield Site(root, ca, broker, box, srv)


def test_fleet_send_update_installs_the_bundle_and_the_outcome_is_an_ops_event(site: Site) -> None:
    rc, res = site.send("--arg", f"url={site.srv.url}", "--arg", f"sha256={SHA}", "--arg", "reboot=false")
    assert rc == 0 and (res["code"], res["result"]) == (200, {"accepted": True}), res
    ev = site.outcome(res["cmd_id"])
    assert (ev["kind"], ev["bundle_version"], ev["slot"], ev["reboot"]) == \
        ("update.installed", "2.0", "B", False)
    kinds = [e["kind"] for e in site.events() if e.get("cmd_id") == res["cmd_id"]]
    assert kinds[:2] == ["update.accepted", "update.progress"] and "update.fetched" in kinds
    assert f"install {site.box.state_dir / 'update' / SHA}.raucb" in (site.root / "bin" / "args").read_text()


def test_fleet_send_update_for_a_url_outside_the_sources_is_refused_403(site: Site) -> None:
    url = site.srv.url.replace("/updates/", "/other/")
    rc, res = site.send("--arg", f"url={url}", "--arg", f"sha256={SHA}")
    assert rc == 1 and res["code"] == 403, res
    kinds = [e["kind"] for e in site.events() if e.get("cmd_id") == res["cmd_id"]]
    assert kinds == ["command.refused"]  # and no worker: no update.* event


@pytest.fixture(scope="module")
def stalled_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """A box whose update server sends 1 MiB of the bundle, then nothing (the connection open)."""
    root = tmp_path_factory.mktemp("update-ops-stalled")
    with update_site(root, stall_after=1 << 20) as (ca, broker, box, srv):
        try:
            yield Site(root, ca, broker, box, srv)
        finally:
            box.stop()
            for pid in workers(box):  # a worker a failed test left behind (its own session)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def test_a_daemon_stopped_mid_download_ends_its_worker_and_reports_the_update_interrupted(
        stalled_site: Site) -> None:
    """SIGTERM while the worker's download hangs: the worker's PID is gone by the time the
    daemon has exited (within seconds), and the command's outcome is `update.failed`
    `interrupted`, reported once (a restart adds nothing)."""
    site = stalled_site
    rc, res = site.send("--arg", f"url={site.srv.url}", "--arg", f"sha256={SHA}", "--arg", "reboot=false")
    assert rc == 0 and (res["code"], res["result"]) == (200, {"accepted": True}), res
    part = site.box.state_dir / "update" / f"{SHA}.raucb.part"
    wait_for(lambda: part.exists() and part.stat().st_size >= 1 << 20, 60, "the download stalled at 1 MiB",
             detail=site.box.log_text)
    [pid] = workers(site.box)
    t0 = time.monotonic()
    assert site.box.stop(timeout=60) == 0
    took = time.monotonic() - t0
    print(f"\ndaemon and its update worker stopped {took:.1f} s after SIGTERM")
    assert not Path(f"/proc/{pid}").exists() and workers(site.box) == []
    assert took < 30
    def outcomes() -> list[tuple[str, str | None]]:
        return [(e["kind"], e.get("reason")) for e in site.events() if e.get("cmd_id") == res["cmd_id"]
                and e["kind"] in ("update.installed", "update.refused", "update.failed")]
    assert outcomes() == [("update.failed", "interrupted")]  # in the outbox before the daemon exited
    site.box.start()
    site.ping()
    assert outcomes() == [("update.failed", "interrupted")]


def test_a_worker_left_by_a_killed_daemon_is_ended_and_reported_interrupted_at_the_next_start(
        stalled_site: Site) -> None:
    """The daemon SIGKILLed (no stop of its own) while the download hangs: its worker, in a
    session of its own, lives on; the next start ends it and reports the command
    `update.failed` `interrupted`, once."""
    site = stalled_site
    rc, res = site.send("--arg", f"url={site.srv.url}", "--arg", f"sha256={SHA}", "--arg", "reboot=false")
    assert rc == 0 and res["code"] == 200, res
    [pid] = wait_for(lambda: workers(site.box), 30, "the worker")  # its download stalls
    site.box.kill9()
    assert workers(site.box) == [pid]  # the daemon is gone, its worker is not
    site.box.start()
    ev = site.outcome(res["cmd_id"])
    assert (ev["kind"], ev["reason"]) == ("update.failed", "interrupted")
    wait_for(lambda: workers(site.box) == [], 10, "the left worker ended")
    site.box.stop()
    site.box.start()
    site.ping()
    assert [e["kind"] for e in site.events() if e.get("cmd_id") == res["cmd_id"]
            and e["kind"].startswith("update.f")] == ["update.failed"]
