"""What the command line does with a center config: `appliance ingest`, and the center's
side of `appliance config check` and `appliance keys init` (appliance/cli/ picks these when the
--config file is a center config, `config.is_center_config`).

How it fails: problems with the config or its files are `ConfigError` (exit 78, one line
per problem naming file and key), a drop folder missing or on another file system than
the state dir `StateError` (73), as for the appliance.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import tomllib
from pathlib import Path
from types import FrameType

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.core import crypto, durable
from appliance.core.errors import ConfigError, KeyFileError
from appliance.ingest import receipt as receipts
from appliance.ingest.config import CenterConfig, is_center_config


def is_center_file(path: Path | None) -> bool:
    """Is the main file at `path` a center config? (An unreadable file is not; the
    appliance's loader then reports it.)"""
    if path is None:
        return False
    try:
        with path.open("rb") as f:
            return is_center_config(tomllib.load(f))
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
        return False


def problems(cfg: CenterConfig) -> list[str]:
    """Every file the center config names that `appliance ingest` could not use."""
    ing = cfg.ingest
    found: list[tuple[str, str]] = []

    def check(key: str, fn: object, path: Path) -> None:
        try:
            fn(path)  # type: ignore[operator]
        except KeyFileError as e:
            found.append((key, str(e)))

    check("ingest.key", crypto.load_private_key, ing.key)
    check("ingest.signing_key", receipts.load_signing_key, ing.signing_key)
    if ing.pacs.tls is not None:
        for name in ("cert", "ca"):
            p = getattr(ing.pacs.tls, name)
            if not p.is_file():
                found.append((f"ingest.pacs.tls.{name}", f"{p} does not exist or is not a file"))
        check("ingest.pacs.tls.key", crypto.check_private_key_file, ing.pacs.tls.key)
    if not ing.drop_dir.is_dir():
        found.append(("ingest.drop_dir", f"{ing.drop_dir} does not exist or is not a folder"))
    if ing.state_dir.exists() and not ing.state_dir.is_dir():
        found.append(("ingest.state_dir", f"{ing.state_dir} exists and is not a directory"))
    elif ing.drop_dir.is_dir() and _nearest(ing.state_dir).stat().st_dev != ing.drop_dir.stat().st_dev:
        found.append(("ingest.state_dir", f"{ing.state_dir} is not on the file system of "
                      f"ingest.drop_dir {ing.drop_dir}: bundles are claimed by renaming them"))
    return [f"{cfg.file_of(k)}: {k}: {msg}" for k, msg in found]


def _nearest(p: Path) -> Path:
    while not p.exists():
        p = p.parent
    return p


def keys_init(cfg: CenterConfig) -> list[str]:
    """Create the center's key pair (`key`, public half `<key>.pub`) and receipt signing
    key pair (`signing_key`, `<signing_key>.pub`) when missing; never replace one."""
    ing = cfg.ingest
    out = []
    if ing.key.exists():
        crypto.load_private_key(ing.key)
        out.append(f"center key: {ing.key} exists, kept")
    else:
        crypto.create_keypair(ing.key, ing.key.with_suffix(".pub"))
        out.append(f"center key: {ing.key} created, public key {ing.key.with_suffix('.pub')} "
                   "(give it to the appliances: encryption.recipients)")
    if ing.signing_key.exists():
        receipts.load_signing_key(ing.signing_key)
        out.append(f"receipt signing key: {ing.signing_key} exists, kept")
    else:
        key = Ed25519PrivateKey.generate()
        pub = ing.signing_key.with_suffix(".pub")
        durable.make_dirs(ing.signing_key.parent)
        _create(ing.signing_key, receipts.private_pem(key), 0o600)
        _create(pub, receipts.public_pem(key), 0o644)
        out.append(f"receipt signing key: {ing.signing_key} created, public key {pub}")
    return out


def _create(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        durable.fsync_file(f)
    durable.fsync_dir(path.parent)


def run(cfg: CenterConfig, once: bool) -> int:
    """`appliance ingest`: one pass (--once; prints the counts as JSON) or the service."""
    from appliance.core import log
    from appliance.ingest.service import build

    found = problems(cfg)
    if found:
        raise ConfigError(found)
    log.setup(cfg.ingest.log_level, cfg.ingest.log_format)
    ingester = build(cfg.ingest)
    try:
        if once:
            counts = ingester.run_pass()
            print(json.dumps(dict(sorted(counts.items()))), flush=True)
            return 0
        stop = threading.Event()

        def on_signal(signum: int, frame: FrameType | None) -> None:
            stop.set()
            ingester.cancelled.set()  # a store in progress ends at its next poll: pending

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        ingester.serve(stop)
        return 0
    finally:
        ingester.close()
