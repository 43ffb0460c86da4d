"""Log lines never carry an exception's message: library errors quote values (UIDs, names)."""

from __future__ import annotations

import io
import json

import structlog

from appliance.core import log


def test_exception_is_logged_by_type_and_frames_not_message() -> None:
    out = io.StringIO()
    log.setup("info", "json", stream=out)
    try:
        try:
            raise ValueError("Invalid value for VR UI: '1.2.840.99999.1' (DOE^JANE)")
        except ValueError:
            structlog.get_logger("t").exception("store.internal_error", error_type="ValueError")
        line = json.loads(out.getvalue().strip().splitlines()[-1])
    finally:
        structlog.reset_defaults()
    assert line["event"] == "store.internal_error"
    assert line["exception"].startswith("ValueError at test_log.py:")
    assert "1.2.840.99999.1" not in out.getvalue() and "DOE" not in out.getvalue()
