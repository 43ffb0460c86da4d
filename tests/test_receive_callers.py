"""Who may send: the calling AE title allowlist, optionally bound to source addresses."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.peers import Appliance, dcmtk_env, echoscu, free_port, storescu, wait_for
from tests.receive_support import daemon_log_events, held_config

ONE_CT = "transfer_syntax/WG04/CT2/CT2_UNC"

Factory = Callable[..., Appliance]


def start(factory: Factory, root: Path, **receive: Any) -> Appliance:
    return factory(held_config(root, free_port(), **receive), root=root)


def assert_rejected(r: subprocess.CompletedProcess[str]) -> None:
    assert r.returncode != 0, r.stderr
    assert "Association Rejected" in r.stderr, r.stderr


def rejected_events(app: Appliance, calling_ae: str) -> list[dict[str, Any]]:
    return [e for e in daemon_log_events(app.log_text())
            if e.get("event") == "association.rejected" and e.get("calling_ae") == calling_ae]


def test_unknown_calling_ae_is_rejected(appliance_factory: Factory, tmp_path: Path,
                                        samples: Path) -> None:
    """An AE title that is not on the allowlist cannot associate (C-ECHO or C-STORE);
    each attempt is logged as association.rejected; a listed caller still works."""
    app = start(appliance_factory, tmp_path / "a")
    assert_rejected(echoscu(app.port, aet="STRANGER"))
    assert_rejected(storescu(app.port, [samples / ONE_CT], aet="STRANGER"))
    wait_for(lambda: len(rejected_events(app, "STRANGER")) == 2, what="2 association.rejected lines")
    assert app.status()["receive"]["associations_rejected"] == 2
    assert app.spooled() == {}
    assert echoscu(app.port, aet="MODALITY").returncode == 0


@pytest.mark.parametrize(("hosts", "accepted"), [(["10.9.9.9"], False), (["127.0.0.0/8"], True)],
                         ids=["bound-elsewhere", "bound-to-loopback"])
def test_caller_bound_to_hosts(appliance_factory: Factory, tmp_path: Path, samples: Path,
                               hosts: list[str], accepted: bool) -> None:
    """A caller entry with `hosts` admits that AE title only from those addresses: the
    same AE title from 127.0.0.1 is rejected when bound to 10.9.9.9 and accepted when
    bound to 127.0.0.0/8."""
    app = start(appliance_factory, tmp_path / "a", callers=[{"ae_title": "CT_SCANNER", "hosts": hosts}])
    echo = echoscu(app.port, aet="CT_SCANNER")
    stored = storescu(app.port, [samples / ONE_CT], aet="CT_SCANNER")
    if accepted:
        assert echo.returncode == 0, echo.stderr
        assert stored.returncode == 0 and "Store Failed" not in stored.stderr, stored.stderr
        assert len(app.spooled()) == 1
        assert rejected_events(app, "CT_SCANNER") == []
    else:
        assert_rejected(echo)
        assert_rejected(stored)
        wait_for(lambda: len(rejected_events(app, "CT_SCANNER")) == 2, what="association.rejected lines")
        assert app.spooled() == {}


def test_accept_any_caller_accepts_anyone(appliance_factory: Factory, tmp_path: Path,
                                          samples: Path) -> None:
    """With accept_any_caller = true (a closed network), any AE title may store."""
    app = start(appliance_factory, tmp_path / "a", accept_any_caller=True, callers=[])
    assert echoscu(app.port, aet="WHOEVER").returncode == 0
    r = storescu(app.port, [samples / ONE_CT], aet="ANY_OTHER")
    assert r.returncode == 0 and "Store Failed" not in r.stderr, r.stderr
    assert len(app.spooled()) == 1
    assert app.status()["receive"]["associations_rejected"] == 0


def test_wrong_called_ae_title_is_rejected(appliance_factory: Factory, tmp_path: Path,
                                           samples: Path) -> None:
    """An allowed caller addressing another AE title than receive.ae_title is rejected with
    "called AE title not recognised" (C-ECHO and C-STORE); counted and logged as such."""
    app = start(appliance_factory, tmp_path / "a")
    echo = echoscu_called(app.port, "WRONG")
    stored = storescu(app.port, [samples / ONE_CT], called="WRONG")
    for r in (echo, stored):
        assert_rejected(r)
        assert "Called AE Title Not Recognized" in r.stderr, r.stderr
    wait_for(lambda: len(rejected_events(app, "MODALITY")) == 2, what="2 association.rejected lines")
    assert {e["reason"] for e in rejected_events(app, "MODALITY")} == {"called AE title not recognised"}
    st = app.status()["receive"]
    assert st["associations_rejected_by_reason"] == {"called_ae": 2}
    assert app.spooled() == {}


def test_called_ae_title_check_can_be_turned_off(appliance_factory: Factory, tmp_path: Path,
                                                 samples: Path) -> None:
    """With check_called_ae = false, a scanner that cannot be set to our AE title stores."""
    app = start(appliance_factory, tmp_path / "a", check_called_ae=False)
    r = storescu(app.port, [samples / ONE_CT], called="ANYTHING")
    assert r.returncode == 0 and "Store Failed" not in r.stderr, r.stderr
    assert len(app.spooled()) == 1


def echoscu_called(port: int, called: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["echoscu", "-aet", "MODALITY", "-aec", called, "127.0.0.1", str(port)],
                          capture_output=True, text=True, timeout=60, env=dcmtk_env())
