"""An update handed off to the root side whose worker is gone before the result comes
(update/handoff.py, update/remote.py Runner.recover; docs/updates.md "Remote updates").

The whole path as tests/test_update_remote_ops.py runs it (`appliance fleet send`, a real
Mosquitto, a real daemon, its worker fetching from a real HTTPS server, the stand-in
`rauc`), with the hand-off forced (APPLIANCE_UPDATE_HANDOFF=1: the tests run as root) and
the root side run by the test as the path unit runs it, `appliance update-install`, at the
moment the test chooses: after the daemon was restarted, or after its worker was killed.
The outcome is read from the daemon's outbox of ops events, where the ops link sends it
from."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.update import handoff
from tests.mosquitto import MOSQUITTO
from tests.peers import REPO, wait_for
from tests.test_update_remote import SHA
from tests.test_update_remote_ops import Site, update_site, workers

FINAL = ("update.installed", "update.refused", "update.failed")
pytestmark = [pytest.mark.ops, pytest.mark.peers,
              pytest.mark.skipif(not Path(MOSQUITTO).exists(), reason="mosquitto not installed (make peers)")]


class HandoffSite(Site):
    @property
    def ready(self) -> Path:
        return self.box.state_dir / handoff.FOLDER

    def send_update(self) -> str:
        rc, res = self.send("--arg", f"url={self.srv.url}", "--arg", f"sha256={SHA}", "--arg", "reboot=false")
        assert rc == 0 and (res["code"], res["result"]) == (200, {"accepted": True}), res
        wait_for(lambda: (self.ready / handoff.REQUEST).exists(), 120, "the worker's hand-off request",
                 detail=self.box.log_text)
        return str(res["cmd_id"])

    def worker_pid(self) -> int:
        """The daemon's `update-fetch` worker (its own session)."""
        found = workers(self.box)
        if not found:
            raise AssertionError("no update-fetch worker")
        return found[0]

    def kill_worker(self) -> None:
        """What systemd does to the daemon's cgroup when it stops it (KillMode=control-group)."""
        pid = self.worker_pid()
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not Path(f"/proc/{pid}").exists() or
                 "Z" in Path(f"/proc/{pid}/stat").read_text().split(")")[-1][:3], 30, "the worker gone")

    def install_as_root(self) -> None:
        """appliance-update-install.service, as the path unit starts it."""
        env = {**os.environ, "PATH": f"{self.root / 'bin'}:{os.environ['PATH']}",
               "APPLIANCE_UPDATE_TRIAL": str(self.root / "data" / "trial.json")}
        r = subprocess.run([sys.executable, "-m", "appliance", "update-install", "--config",
                            str(self.box.config_path)], capture_output=True, text=True, timeout=120,
                           cwd=REPO, env=env)
        assert r.returncode == 0, r.stdout + r.stderr

    def finals(self, cmd_id: str) -> list[dict[str, Any]]:
        return [e for e in self.events() if e.get("cmd_id") == cmd_id and e["kind"] in FINAL]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HandoffSite]:
    root = tmp_path_factory.mktemp("update-handoff-ops")
    with update_site(root, APPLIANCE_UPDATE_HANDOFF="1") as (ca, broker, box, srv):
        s = HandoffSite(root, ca, broker, box, srv)
        try:
            yield s
        finally:
            box.stop()
            for _ in range(2):  # a worker a failed test left behind
                try:
                    os.kill(s.worker_pid(), signal.SIGKILL)
                except AssertionError:
                    break


def test_result_written_while_the_daemon_was_down_is_reported_at_its_start_once(site: HandoffSite) -> None:
    cmd_id = site.send_update()
    site.box.stop()  # it ends its worker waiting for the root side, and reports nothing yet
    assert workers(site.box) == []
    site.install_as_root()  # the root side answers while no daemon waits
    assert (site.ready / handoff.RESULT).exists()
    site.box.start()
    ev = site.outcome(cmd_id)
    assert (ev["kind"], ev["bundle_version"], ev["slot"], ev["reboot"]) == \
        ("update.installed", "2.0", "B", False)
    wait_for(lambda: not (site.ready / handoff.RESULT).exists(), 30, "the reported result removed")
    site.box.stop()
    site.box.start()  # a second start has nothing left to report
    site.ping()
    assert [e["kind"] for e in site.finals(cmd_id)] == ["update.installed"]


def test_result_after_the_worker_was_killed_is_reported_by_the_daemon(site: HandoffSite) -> None:
    cmd_id = site.send_update()
    site.kill_worker()
    site.install_as_root()
    ev = site.outcome(cmd_id)
    assert (ev["kind"], ev["bundle_version"], ev["slot"]) == ("update.installed", "2.0", "B")
    wait_for(lambda: not (site.ready / handoff.RESULT).exists(), 30, "the reported result removed")
    assert [e["kind"] for e in site.finals(cmd_id)] == ["update.installed"]
