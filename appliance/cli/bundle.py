"""`appliance bundle inspect|extract`: a bundle file's header, its manifest when a key
opens it (ids only, never a UID), and its instances written out as Part-10 files after
verification. A missing file is NotFoundError (66); a key that does not open it, the
bundle format's own errors."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from appliance.cli.times import TIME_FIELDS, when, with_iso_times
from appliance.core import config, crypto
from appliance.core.errors import NotFoundError, UsageError


def cmd_bundle(args: argparse.Namespace) -> int:
    from appliance.bundle import format as bundle

    key_path, explicit = _bundle_key(args)
    if args.sub == "inspect":
        _print_bundle(_inspect(args.file, key_path, explicit), args.json)
        return 0
    if key_path is None:
        raise UsageError("appliance bundle extract: give --key, or --config to use its"
                         f" encryption.appliance_key ({config.default_path()} does not exist)")
    key = crypto.load_private_key(key_path)
    args.out.mkdir(parents=True, exist_ok=True)
    with _open_input(args.file) as f:
        manifest = bundle.extract(f, key, args.out)
    print(f"{len(manifest.instances)} instances written to {args.out}")
    return 0


def _inspect(path: Path, key_path: Path | None, explicit: bool) -> dict[str, Any]:
    """A bundle's header, and its manifest when `key_path` opens it (verifying it all)."""
    from appliance.bundle import format as bundle

    with _open_input(path) as f:
        header = bundle.read_header(f)
        out: dict[str, Any] = {
            "bundle_id": header.bundle_id, "format_version": header.version,
            "created": header.created, "suite": header.suite_name, "chunk_size": header.chunk_size,
            "recipients": [r.key_id.hex() for r in header.recipients],
        }
        key = crypto.load_private_key(key_path) if key_path is not None else None
        if key is not None and not explicit and bundle.recipient_key_id(key.public_key()) not in {
                r.key_id for r in header.recipients}:
            # The box's own key, not asked for: a bundle of another box still shows its header.
            out["manifest_not_shown"] = f"encryption.appliance_key ({key_path}) is not a recipient"
        elif key is not None:
            f.seek(0)
            m = bundle.read_manifest(f, key)
            out["study"] = m.study_key
            # ids only: a UID identifies a patient's study as surely as a name does
            out["instances"] = [{"index": e.index, "sop_class": e.sop_class,
                                 "transfer_syntax": e.transfer_syntax, "action": e.action,
                                 "reason": e.reason, "received_size": e.received_size,
                                 "size": e.size, "sha256": e.sha256} for e in m.instances]
    return out


def _bundle_key(args: argparse.Namespace) -> tuple[Path | None, bool]:
    """(the private key file that opens bundles, given explicitly?): --key, else the
    config's encryption.appliance_key (--config, or the default config when it exists)."""
    if args.key is not None:
        return args.key, True
    if args.config is not None or config.default_path().exists():
        return config.load(args.config).encryption.appliance_key, False
    return None, False


def _print_bundle(out: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(with_iso_times(out), indent=2))
        return
    now = time.time()
    for k, v in out.items():
        if k == "manifest_not_shown":
            print(f"{'manifest':15} not shown: {v}")
        elif k != "instances":
            print(f"{k:15} {when(v, now) if k in TIME_FIELDS else v}")
    for e in out.get("instances", []):
        print(f"  [{e['index']}] {e['action']:11} {e['received_size']:>10} -> {e['size']:>10}"
              f"  {e['transfer_syntax']}  sop_class {e['sop_class']}")


def _open_input(p: Path) -> Any:
    try:
        return p.open("rb")
    except FileNotFoundError:
        raise NotFoundError(f"{p} does not exist") from None
    except IsADirectoryError:
        raise UsageError(f"{p} is a directory, not a bundle file") from None
