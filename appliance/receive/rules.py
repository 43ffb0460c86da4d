"""Routing rules: which studies are stat (`[[rules]]` in the config).

A rule gives a study its priority from what the receiver sees of each instance: the
calling AE title, the C-STORE request's Priority field, and four attributes near the
start of the data set - Modality (0008,0060), Study Description (0008,1030), Body Part
Examined (0018,0015), Requested Procedure Description (0032,1060). Each criterion is a
list of case-insensitive shell patterns (`*STROKE*`), any of which may match; a rule
matches when every criterion it names does. Rules are tried in order; the first that
matches decides; none: routine. A study becomes stat as soon as one of its instances
matches a stat rule, and stays stat (`Queue.raise_priority`): its segments already
waiting are raised too.

A rule may also name destinations (`Rule.destinations`): the study goes only there. The
first rule that matches an instance of the study decides; the spool stores its names as
the study's route (`queue.routes.set_route`), which the study's later segments take too,
so that a restart keeps it (docs/architecture.md, "Copy destinations and routing rules").

Facts are read only when rules exist, from at most `FACTS_PREFIX` bytes of the instance
(inflated first if it is deflated, capped), with pydicom's partial reader stopping past
(0032,1060). An instance whose start cannot be parsed gives empty attributes: criteria on
them do not match (the instance itself was accepted by `identify` already). Values are
compared, never logged: a description can hold patient data; log lines name the rule.
"""

from __future__ import annotations

import fnmatch
import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset
from pydicom.filereader import data_element_generator
from pydicom.tag import BaseTag, Tag

from appliance.core import dicomscan
from appliance.core.config import Rule
from appliance.queue.store import PRIORITY_ROUTINE, PRIORITY_STAT
from appliance.receive.identify import inflated_prefix

FACTS_PREFIX = 64 << 10
_STOP = 0x00321060  # Requested Procedure Description, the last tag rules look at
_TAGS: list[BaseTag | int] = [Tag(t) for t in (0x00080005, 0x00080060, 0x00081030, 0x00180015, _STOP)]
# The C-STORE request's Priority (PS3.7 9.1.1.1.4): 0 medium, 1 high, 2 low.
_CSTORE_PRIORITY = {0: "medium", 1: "high", 2: "low"}
PRIORITIES = {"stat": PRIORITY_STAT, "routine": PRIORITY_ROUTINE}


@dataclass(frozen=True)
class Facts:
    calling_ae: str = ""
    cstore_priority: str = "medium"
    modality: str = ""
    study_description: str = ""
    requested_procedure: str = ""
    body_part: str = ""


def cstore_priority(value: Any) -> str:
    try:
        return _CSTORE_PRIORITY.get(int(value), "medium")
    except (TypeError, ValueError):
        return "medium"


def _matches(patterns: Sequence[str], value: str) -> bool:
    v = value.strip().upper()
    return any(fnmatch.fnmatchcase(v, p.strip().upper()) for p in patterns)


def matches(rule: Rule, f: Facts) -> bool:
    """Whether every criterion the rule names matches (pure)."""
    checks = [(rule.calling_ae, f.calling_ae), (rule.modality, f.modality),
              (rule.study_description, f.study_description),
              (rule.requested_procedure, f.requested_procedure), (rule.body_part, f.body_part)]
    if not all(_matches(p, v) for p, v in checks if p):
        return False
    return not rule.cstore_priority or f.cstore_priority in rule.cstore_priority


def first_match(rules: Sequence[Rule], f: Facts) -> Rule | None:
    return next((r for r in rules if matches(r, f)), None)


def needs_attributes(rules: Sequence[Rule]) -> bool:
    return any(r.modality or r.study_description or r.requested_procedure or r.body_part
               for r in rules)


def read_facts(head: bytes, calling_ae: str, priority: str) -> Facts:
    """The facts of an instance from the start of its Part-10 bytes (see the module
    docstring); attributes that cannot be read are empty."""
    attrs = _attributes(head)
    return Facts(calling_ae=calling_ae, cstore_priority=priority,
                 modality=attrs.get(0x00080060, ""), study_description=attrs.get(0x00081030, ""),
                 requested_procedure=attrs.get(_STOP, ""), body_part=attrs.get(0x00180015, ""))


def _attributes(head: bytes) -> dict[int, str]:
    return attributes(head, _TAGS, _STOP)


def attributes(head: bytes, tags: Sequence[int], stop: int) -> dict[int, str]:
    """Text values of `tags` (each at or below `stop`) read from the start of a Part-10
    instance; a tag that is absent, past the prefix or does not decode is left out."""
    meta = dicomscan.file_meta(head)
    if meta is None:
        return {}
    start, m = meta
    ts = m[dicomscan.TRANSFER_SYNTAX]
    data = head[start:]
    if ts == dicomscan.DEFLATED:
        data, _ = inflated_prefix([head], start, FACTS_PREFIX)
    implicit = ts == "1.2.840.10008.1.2"
    little = ts != "1.2.840.10008.1.2.2"

    def past(tag: BaseTag, vr: str | None, length: int) -> bool:
        return bool(tag > stop)

    ds = Dataset()
    try:  # elements read before the prefix ends or breaks are kept
        for raw in data_element_generator(io.BytesIO(data), implicit, little, stop_when=past,
                                          specific_tags=list(tags)):
            ds[raw.tag] = raw
    except Exception:  # noqa: BLE001, S110 - the rest matches no attribute criterion
        pass
    out = {}
    for tag in tags:
        try:
            v = ds[tag].value if tag in ds else None
        except Exception:  # noqa: BLE001 - a value that does not decode matches nothing
            v = None
        if v is not None:
            out[tag] = str(v)
    return out
