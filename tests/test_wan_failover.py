"""Failover and failback over the emulated WAN (issue 11, item 10), with the real daemon,
two centers each with its Orthanc (tests/wan_failover.py).

The link to center A is cut with an nft partition while a bundle is on its way: a silent
link (no RST, no ICMP, the connection stays open), not a clean stop. The appliance must
notice it by its link timeout (TCP_USER_TIMEOUT and keep-alives, `link_timeout_s`), not
after the PACS's own `timeout_s` (60 s here), and send to center B within the target.
Nothing is lost (every acknowledged instance is at A or B) and nothing is C-STOREd twice
at the same PACS. When the link heals, A's probe answers and a new study goes to A.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.receive_bench import generate_study
from tests.e2e_support import read_dataset, settled
from tests.peers import cli, storescu, wait_for
from tests.wan_failover import TIMEOUT_S, Modality, held, problems, two_centers

pytestmark = pytest.mark.wan

FAILOVER_TARGET_S = 15.0  # issue 11: from the cut to the first byte accepted by B
SLICES = 80


def uids(files: list[Path]) -> set[str]:
    return {str(read_dataset(f).SOPInstanceUID) for f in files}


def test_primary_cut_mid_bundle_moves_to_b_within_target_then_fails_back(tmp_path: Path) -> None:
    study = generate_study(tmp_path / "study", SLICES)
    later = generate_study(tmp_path / "later", 10)
    with two_centers(tmp_path / "bed") as bed:
        bed.wan.link.rate(10)
        bed.wan.links["center_b"].rate(10)
        modality = Modality(bed.app.port, study, bed.wan.site.name)
        try:
            cut = bed.cut_mid_bundle(min_at_a=15)
        finally:
            modality.join(300)
        print(f"\nfailover over the WAN: {cut.seconds:.1f} s from the cut to the first instance"
              f" at B (A held {cut.at_a} of {SLICES}, {cut.active} bundle(s) in flight)")
        assert modality.codes and set(modality.codes) == {0}, modality.codes
        assert cut.active > 0 and cut.at_a < SLICES
        assert cut.seconds <= FAILOVER_TARGET_S < TIMEOUT_S
        wait_for(lambda: settled(bed.app.state_dir), 300, "every bundle delivered", poll=0.5,
                 detail=bed.detail)
        dests = bed.destinations()
        assert dests["center-a"]["state"] == "down", dests
        assert dests["center-a"]["last_error"] == "timeout", dests  # "nothing acknowledged within"
        assert "went silent" in bed.app.log_text()

        bed.wan.link.heal()  # A's probe answers; new studies go back to A
        wait_for(lambda: bed.destinations()["center-a"]["state"] == "up", 60,
                 "center A up again in status", poll=0.5, detail=bed.detail)
        status = cli("status", "--config", str(bed.app.config_path), check=True).stdout
        assert "center-a: UP" in status and "center-b: UP" in status
        at_b = held(bed.b)
        r = storescu(bed.app.port, later, netns=bed.wan.site.name, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        wait_for(lambda: uids(later) <= set(held(bed.a)), 120, "the later study at A", poll=0.5,
                 detail=bed.detail)
        assert held(bed.b) == at_b, "the later study went to B after the failback"

        # nothing lost (every acknowledged instance is at A or B), nothing C-STOREd twice
        # at the same PACS (Orthanc would hide it by keeping one)
        assert not problems(bed.a, bed.b, uids(study) | uids(later))
        assert held(bed.b), "nothing went to B"
        assert not uids(later) & set(held(bed.b))
