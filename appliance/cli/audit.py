"""`appliance audit show`: the local audit trail, opened (it is sealed at rest).

Prints each DICOM AuditMessage of `STATE/audit/audit.log` (oldest file first with
`--all`, which includes the rotated ones) as one line of XML, for the hospital's
auditor or to feed its audit repository. The output holds patient IDs and study UIDs
by design: it goes to stdout only. A line that does not open (altered, torn by a crash,
or sealed under another spool key) is reported on stderr by file and line number, and
the exit code is then 65 (data error). Each use is itself audited first (Audit Log
Used, PS3.15 A.5.3.2), so the output ends with it.
"""

from __future__ import annotations

import argparse
import sys

from appliance.audit.trail import FILE, read
from appliance.cli import audited
from appliance.core import config, crypto

EX_DATAERR = 65


def cmd_audit_show(args: argparse.Namespace) -> int:
    cfg = config.load(args.config)
    key = crypto.load_spool_key(cfg.spool.key_file).audit_key()
    audited.record(cfg, lambda t: t.log_used(audited.operator()))  # before it is read
    folder = cfg.appliance.state_dir / "audit"
    files = [folder / FILE]
    if args.all:
        rotated = [p for p in folder.glob(f"{FILE}.*") if p.suffix[1:].isdigit()]
        files = [*sorted(rotated, key=lambda p: int(p.suffix[1:]), reverse=True), *files]
    bad = 0
    for path in files:
        if not path.exists():
            continue
        for n, message in enumerate(read(path, key), 1):
            if message is None:
                bad += 1
                print(f"{path.name}:{n}: does not open (altered, torn, or another spool key)",
                      file=sys.stderr)
                continue
            sys.stdout.write(message.decode("utf-8") + "\n")
    return EX_DATAERR if bad else 0
