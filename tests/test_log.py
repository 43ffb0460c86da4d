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


def _seen(level: str, emit: str) -> tuple[list[str], str]:
    """What a tap and the log stream see of one `emit`-level event under `level`."""
    out, tapped = io.StringIO(), []
    log.setup(level, "json", stream=out)
    untap = log.add_tap(lambda kind, fields: tapped.append(kind))
    try:
        getattr(structlog.get_logger("t"), emit)("bundle.delivered", destination="pacs")
    finally:
        untap()
        structlog.reset_defaults()
    return tapped, out.getvalue()


def test_taps_see_info_events_the_log_level_hides() -> None:
    tapped, text = _seen("warning", "info")
    assert tapped == ["bundle.delivered"] and text == ""


def test_an_event_at_the_log_level_reaches_both_tap_and_log() -> None:
    tapped, text = _seen("warning", "warning")
    assert tapped == ["bundle.delivered"] and json.loads(text)["event"] == "bundle.delivered"


def test_debug_events_stay_filtered_before_the_taps_at_info() -> None:
    assert _seen("info", "debug") == ([], "")
