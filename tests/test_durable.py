"""core.durable is the one place that fsyncs (STYLE.md): each fsync there is named with
what it protects, and a new one elsewhere fails here."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

from appliance.core import durable

PACKAGE = Path(__file__).resolve().parents[1] / "appliance"
SYNC_CALLS = {"fsync", "fdatasync", "sync", "syncfs", "sync_file_range"}


def test_no_module_but_durable_calls_fsync() -> None:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == PACKAGE / "core" / "durable.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                fn = node.func
                name = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else ""
                if name in SYNC_CALLS:
                    found.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {name}()")
    assert not found, found


def test_fsync_file_makes_what_was_written_durable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real = os.fsync

    def spy(fd: int) -> None:
        synced.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    with (tmp_path / "f").open("wb") as f:
        f.write(b"data")  # still in Python's buffer
        durable.fsync_file(f)
        assert synced == [f.fileno()]
        assert os.fstat(f.fileno()).st_size == 4  # flushed before the fsync
