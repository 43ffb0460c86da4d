"""`appliance echo [DEST ...]`: does each destination answer, and if not, why.

For the technician on site and the person on call: a C-ECHO to a PACS, an SSH handshake
with the pinned host key and a login for SFTP, an HTTP answer for DICOMweb, the folder
there and writable for a directory; each within the destination's own time limit
(`Transport.check()`, the same check the scheduler's probe makes). Runs beside a running
daemon (its own association or connection) and changes nothing. Exit 0 when every
destination asked answers, 69 when one does not.
"""

from __future__ import annotations

import argparse
import sys
import time

from appliance.core import config
from appliance.core import log as applog
from appliance.core.errors import EX_UNAVAILABLE, NotFoundError


def where(d: config.Destination) -> str:
    """The destination as an operator knows it (from the config, no secrets)."""
    if d.transport == "directory":
        return f"directory {d.path}"
    if d.transport == "dicom":
        return f"dicom {d.host}:{d.port} AE {d.ae_title}" + (" TLS" if d.tls is not None else "")
    if d.transport == "sftp":
        return f"sftp {d.user}@{d.host}:{d.port}"
    if d.transport == "dicomweb":
        return f"dicomweb {d.url}"
    return d.transport


def cmd_echo(args: argparse.Namespace) -> int:
    from appliance.daemon import build_transport

    cfg = config.load(args.config)
    applog.setup("warning", "console", sys.stderr)  # the transports' warnings, not the verdicts
    by_name = {d.name: d for d in cfg.destinations}
    names = args.destinations or list(by_name)
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise NotFoundError(f"no destination named {', '.join(map(repr, unknown))}"
                            f" (the config has: {', '.join(by_name)})")
    failed = 0
    for name in names:
        dest = by_name[name]
        transport = build_transport(dest, cfg)
        t0 = time.monotonic()
        try:
            answer = transport.check()
        finally:
            transport.close()
        took = time.monotonic() - t0
        verdict = "OK" if answer.ok else "FAILED"
        print(f"{name}: {verdict} in {took * 1000:.0f} ms: {answer.detail} ({where(dest)})")
        failed += not answer.ok
    return EX_UNAVAILABLE if failed else 0
