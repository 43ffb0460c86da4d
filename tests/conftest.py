"""Shared fixtures: a factory that starts the real daemon in a temp dir, stopped at teardown."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.peers import SAMPLES, Appliance, base_config, free_port


@pytest.fixture(autouse=True)
def _process_umask() -> Iterator[None]:
    """Each test gets the umask it started with back: appliance.cli.main sets 0077 in the
    process (as the real command should), and a test calling it in-process must not leave
    the next test's files unreadable to the other users it runs things as."""
    old = os.umask(0o022)
    os.umask(old)
    yield
    os.umask(old)


@pytest.fixture
def samples() -> Path:
    if not SAMPLES.is_dir():
        pytest.fail(f"DICOM samples not found at {SAMPLES} (set APPLIANCE_SAMPLES)")
    return SAMPLES


@pytest.fixture
def appliance_factory(tmp_path: Path) -> Iterator[Callable[..., Appliance]]:
    started: list[Appliance] = []

    def make(cfg: dict[str, Any] | None = None, root: Path | None = None, start: bool = True,
             **receive: Any) -> Appliance:
        r = root or tmp_path / f"appliance{len(started)}"
        a = Appliance(r, cfg or base_config(r, free_port(), **receive))
        started.append(a)
        return a.start() if start else a

    yield make
    for a in started:
        a.stop()
        a.kill9()
