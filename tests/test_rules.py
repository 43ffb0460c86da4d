"""Routing rules make a study stat (issue 11, item 7): the pure matching, the facts read
from an instance, the config, the queue's priority, and the daemon sending a stat study
past a routine one that a slow PACS is still taking."""

from __future__ import annotations

import json
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from appliance.core import config
from appliance.core.config import Pack, Rule
from appliance.core.errors import ConfigError
from appliance.pack.policy import SegmentTimes, due_for_sealing, may_pack_now
from appliance.queue import store as queue_store
from appliance.queue.index import open_index
from appliance.queue.store import PRIORITY_STAT, Queue
from appliance.receive import rules
from appliance.receive.rules import Facts
from tests.peers import SAMPLES, Appliance, base_config, cli, free_port, storescu, wait_for

CT = SAMPLES / "series" / "CT_Philips_Ingenuity_phantom_28sl"
MR = SAMPLES / "series" / "MR_Philips_abdomen_11sl"

STROKE = Rule(name="stroke", priority="stat", modality=("CT", "MR"),
              study_description=("*stroke*", "*code s*"))


# --- matching (pure) -----------------------------------------------------------------


@pytest.mark.parametrize(("facts", "expected"), [
    (Facts(modality="CT", study_description="CT HEAD STROKE PROTOCOL"), True),
    (Facts(modality="mr", study_description="Code S"), True),  # case-insensitive
    (Facts(modality="CT", study_description="CT HEAD ROUTINE"), False),
    (Facts(modality="US", study_description="STROKE"), False),  # every criterion must match
    (Facts(modality="CT", study_description=""), False),  # an attribute not read matches nothing
])
def test_a_rule_matches_when_every_criterion_it_names_matches(facts: Facts, expected: bool) -> None:
    assert rules.matches(STROKE, facts) is expected


def test_the_first_matching_rule_decides() -> None:
    keep_routine = Rule(name="research", priority="routine", calling_ae=("RESEARCH_CT",))
    ordered = [keep_routine, STROKE]
    stroke = Facts(calling_ae="RESEARCH_CT", modality="CT", study_description="STROKE")
    assert rules.first_match(ordered, stroke) is keep_routine
    assert rules.first_match(ordered, Facts(calling_ae="CT_ER", modality="CT",
                                            study_description="STROKE")) is STROKE
    assert rules.first_match(ordered, Facts(calling_ae="CT_ER", modality="CT")) is None


def test_a_rule_on_the_cstore_priority_field() -> None:
    high = Rule(name="urgent", priority="stat", cstore_priority=("high",))
    assert rules.matches(high, Facts(cstore_priority=rules.cstore_priority(1)))
    assert not rules.matches(high, Facts(cstore_priority=rules.cstore_priority(0)))
    assert rules.cstore_priority(None) == rules.cstore_priority(7) == "medium"


def test_attributes_are_read_only_when_a_rule_needs_them() -> None:
    assert not rules.needs_attributes([Rule(name="ae", priority="stat", calling_ae=("ER",))])
    assert rules.needs_attributes([STROKE])


# --- facts from an instance ------------------------------------------------------------


def _head(path: Path) -> bytes:
    return path.read_bytes()[: rules.FACTS_PREFIX]


def test_facts_come_from_the_start_of_the_instance() -> None:
    ds = pydicom.dcmread(sorted(CT.iterdir())[0], stop_before_pixels=True)
    f = rules.read_facts(_head(sorted(CT.iterdir())[0]), "CT_ER", "high")
    assert (f.calling_ae, f.cstore_priority) == ("CT_ER", "high")
    assert (f.modality, f.study_description, f.body_part) == (
        ds.Modality, ds.StudyDescription, ds.BodyPartExamined)


def test_facts_of_a_deflated_instance_are_read_from_its_inflated_start(tmp_path: Path) -> None:
    ds = pydicom.dcmread(sorted(CT.iterdir())[0])
    ds.StudyDescription = "CT HEAD STROKE"
    ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    ds.save_as(tmp_path / "d.dcm", enforce_file_format=True)
    assert rules.read_facts(_head(tmp_path / "d.dcm"), "", "medium").study_description == "CT HEAD STROKE"


def test_a_description_in_another_character_set_is_decoded_before_matching() -> None:
    f = rules.read_facts(_head(SAMPLES / "charset" / "chrJapMultiExplicitIR6.dcm"), "", "medium")
    assert (f.modality, f.body_part) == ("CR", "CHEST")


def test_a_start_that_cannot_be_parsed_gives_no_attributes() -> None:
    head = _head(sorted(CT.iterdir())[0])
    assert rules.read_facts(head[:200], "CT", "medium") == Facts(calling_ae="CT")
    assert rules.read_facts(b"\x00" * 4096, "CT", "medium") == Facts(calling_ae="CT")
    garbage = head[:1000] + zlib.compress(b"x" * 5000)
    assert rules.read_facts(garbage, "CT", "medium").modality == "CT"  # what came before is kept


# --- config ------------------------------------------------------------------------------


def _parse(extra: dict[str, Any]) -> config.Config:
    return config.parse({"receive": {"accept_any_caller": True}, **extra}, {}, Path("/etc/a.toml"))


def test_rules_parse_in_order_with_lists_or_single_patterns() -> None:
    cfg = _parse({"rules": [
        {"name": "stroke", "priority": "stat", "modality": "CT", "study_description": ["*STROKE*"]},
        {"name": "urgent", "priority": "stat", "cstore_priority": ["high"]}]})
    assert [r.name for r in cfg.rules] == ["stroke", "urgent"]
    assert cfg.rules[0].modality == ("CT",)
    assert cfg.rules[1].cstore_priority == ("high",)


@pytest.mark.parametrize(("rule", "problem"), [
    ({"name": "x"}, "rules[0].priority: is required (stat or routine)"),
    ({"name": "x", "priority": "urgent"}, "rules[0].priority: must be one of stat, routine"),
    ({"name": "x", "priority": "stat", "modality": []}, "rules[0].modality: must be a non-empty array"),
    ({"name": "x", "priority": "stat", "cstore_priority": "now"},
     "rules[0].cstore_priority: must be one or more of high, medium, low"),
    ({"name": "x", "priority": "stat", "study_descripton": ["*"]}, "rules[0].study_descripton: unknown key"),
])
def test_a_bad_rule_is_refused_naming_its_key(rule: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError) as e:
        _parse({"rules": [rule]})
    assert any(problem in p for p in e.value.problems), e.value.problems


def test_two_rules_with_one_name_are_refused() -> None:
    with pytest.raises(ConfigError, match="duplicate"):
        _parse({"rules": [{"name": "a", "priority": "stat"}, {"name": "a", "priority": "routine"}]})


# --- queue and pack ----------------------------------------------------------------------


def test_a_stat_study_raises_its_waiting_segments_and_its_next_ones_are_stat(tmp_path: Path) -> None:
    q = Queue(tmp_path, open_index(tmp_path))
    with q.index.tx() as c:
        queue_store.open_segment(c, "s1", "study", 1.0)
        queue_store.transition(c, "s1", "seal", 2.0)
        queue_store.open_segment(c, "other", "another", 1.0)
        assert queue_store.raise_priority(c, "study", PRIORITY_STAT) == 1
        queue_store.open_segment(c, "s2", "study", 3.0)
    assert [q.get(s).priority for s in ("s1", "s2", "other")] == [PRIORITY_STAT, PRIORITY_STAT, 0]


def test_a_stat_segment_is_sealed_sooner_and_packed_during_a_burst() -> None:
    cfg = Pack(segment_max_age_s=10, stat_segment_max_age_s=2, study_quiet_s=10)
    assert due_for_sealing(SegmentTimes(0, 2.9, stat=True), cfg, 3.0) == "age"
    assert due_for_sealing(SegmentTimes(0, 2.9, stat=False), cfg, 3.0) is None
    assert may_pack_now(0, receiving_burst=True, cfg=cfg, now=1.0, stat=True)
    assert not may_pack_now(0, receiving_burst=True, cfg=cfg, now=1.0, stat=False)


# --- the daemon: a stat study overtakes a routine one at a slow PACS ------------------------


class SlowPacs:
    """A Storage SCP taking `delay_s` per instance; records when each study's instances came."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.arrived: dict[str, list[float]] = {}
        self.lock = threading.Lock()
        self._saved = _config.UNRESTRICTED_STORAGE_SERVICE
        _config.UNRESTRICTED_STORAGE_SERVICE = True
        ae = AE(ae_title="PACS")
        ae.add_supported_context(Verification)
        ae.maximum_associations = 8
        self.port = free_port()
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._store)])

    def _store(self, event: Any) -> int:
        study = str(event.dataset.StudyInstanceUID)
        time.sleep(self.delay_s)
        with self.lock:
            self.arrived.setdefault(study, []).append(time.monotonic())
        return 0x0000

    def count(self, study: str) -> int:
        with self.lock:
            return len(self.arrived.get(study, []))

    def close(self) -> None:
        self.server.shutdown()
        _config.UNRESTRICTED_STORAGE_SERVICE = self._saved


@pytest.fixture
def slow_pacs() -> Iterator[SlowPacs]:
    p = SlowPacs(0.5)
    yield p
    p.close()


def _stroke_study(out: Path, n: int = 3) -> tuple[list[Path], str]:
    study, series = generate_uid(), generate_uid()
    out.mkdir()
    files = []
    for i, src in enumerate(sorted(MR.iterdir())[:n]):
        ds = pydicom.dcmread(src)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyDescription = "MR HEAD STROKE PROTOCOL"
        ds.save_as(out / f"{i}.dcm", enforce_file_format=True)
        files.append(out / f"{i}.dcm")
    return files, study


@pytest.mark.peers
@pytest.mark.parametrize("with_rule", [True, False], ids=["stat-rule", "no-rule"])
def test_a_stat_study_overtakes_a_routine_one_the_pacs_is_still_taking(
        appliance_factory: Callable[..., Appliance], slow_pacs: SlowPacs, tmp_path: Path,
        with_rule: bool) -> None:
    """One routine lane, a PACS taking 0.5 s per instance, a 28-slice routine study on its
    way (14 s): a 3-image stroke study sent now is at the PACS within a few seconds, long
    before the routine one is done, and `queue list` shows it stat. Without the rule the
    same study waits for the routine bundle (the control: the test can fail)."""
    root = tmp_path / "a"
    cfg = base_config(root, free_port())
    cfg["pack"] = {"study_quiet_s": 0.5, "segment_max_age_s": 30}
    cfg["queue"] = {"lanes": 1}
    cfg["destinations"] = [{"name": "pacs", "transport": "dicom", "host": "127.0.0.1",
                            "port": slow_pacs.port, "ae_title": "PACS", "plaintext": True}]
    if with_rule:
        cfg["rules"] = [{"name": "stroke", "priority": "stat", "study_description": ["*STROKE*"]}]
    app = appliance_factory(cfg, root=root)
    routine = str(pydicom.dcmread(sorted(CT.iterdir())[0], stop_before_pixels=True).StudyInstanceUID)
    stroke, stroke_uid = _stroke_study(tmp_path / "stroke")

    assert storescu(app.port, sorted(CT.iterdir())).returncode == 0
    wait_for(lambda: slow_pacs.count(routine) >= 2, 60, "the routine study reaching the PACS")
    t0 = time.monotonic()
    assert storescu(app.port, stroke).returncode == 0
    wait_for(lambda: slow_pacs.count(stroke_uid) == 3, 60, "the stroke study at the PACS",
             detail=app.log_text)
    took = slow_pacs.arrived[stroke_uid][-1] - t0
    routine_done = slow_pacs.count(routine)
    print(f"stroke study complete at the PACS {took:.1f} s after storescu started;"
          f" routine {routine_done}/28 by then")
    rows = json.loads(cli("queue", "list", "--json", "--config", str(app.config_path),
                          check=True).stdout)
    if with_rule:
        assert routine_done < 28, "the stroke study waited for the whole routine bundle"
        assert took < 8, f"the stroke study took {took:.1f} s"
        assert sum(r["priority"] == "stat" for r in rows) >= 1
    else:
        assert routine_done == 28
        assert all(r["priority"] == "routine" for r in rows)
    wait_for(lambda: slow_pacs.count(routine) == 28, 60, "the routine study at the PACS")
