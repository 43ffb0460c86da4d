"""What one association stored, per study, for its audit message (`appliance.audit`: DICOM Instances
Transferred, written when the association ends).

The receiver notes each stored instance here (its study, SOP class, and - once per
study and association - the patient ID read from the instance's first bytes); at the
end of the association `take` returns the studies. Held in memory only, bounded by
`MAX_STUDIES` per association (a peer sending thousands of one-instance studies on one
association is audited with the first `MAX_STUDIES` and a count of the rest).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from appliance.audit.messages import Study
from appliance.receive import rules

MAX_STUDIES = 1000
PATIENT_ID = 0x00100020
_TAGS = (0x00080005, PATIENT_ID)  # the character set first, so the ID decodes


@dataclass
class _Association:
    studies: dict[str, tuple[str, Counter[str]]] = field(default_factory=dict)
    overflow: int = 0  # instances of studies beyond MAX_STUDIES


class Received:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_assoc: dict[int, _Association] = {}

    def note(self, assoc: int, study_uid: str, sop_class: str, head: Callable[[], bytes]) -> None:
        with self._lock:
            a = self._by_assoc.setdefault(assoc, _Association())
            known = a.studies.get(study_uid)
        if known is None:
            if len(a.studies) >= MAX_STUDIES:
                with self._lock:
                    a.overflow += 1
                return
            pid = rules.attributes(head(), _TAGS, PATIENT_ID).get(PATIENT_ID, "")
            with self._lock:
                known = a.studies.setdefault(study_uid, (pid, Counter()))
        with self._lock:
            known[1][sop_class] += 1

    def take(self, assoc: int) -> tuple[list[Study], int]:
        """The studies the association stored, and how many instances went unnamed."""
        with self._lock:
            a = self._by_assoc.pop(assoc, None)
        if a is None:
            return [], 0
        return [Study(uid, pid, dict(counts)) for uid, (pid, counts) in a.studies.items()], a.overflow
