"""The reading center's config file (`appliance ingest --config CENTER.toml`).

A center config is its own file, not a section of the appliance's: the center box runs
no receiver, spool or packer, and an appliance config never grows an `[ingest]` table
by accident. It is read and checked the way `core.config` reads the appliance's (the
same `_Table` reader: every key has a range, unknown keys are errors, each problem names
`FILE: dotted.key`, relative paths are relative to the file, `conf.d/*.toml` drop-ins
merge the same way), and `[ingest.pacs]` takes exactly the keys of a `dicom`
destination, parsed by the same function, so that the PACS side is the one
`DicomTransport` the appliance uses.

`is_center_config(data)` tells the two kinds apart for `appliance config check` and
`keys init`: a file whose only top-level table is `[ingest]`.

config/center.example.toml documents every key; tests/test_ingest_config.py fails when a
field here is missing there (or the other way round).

Pure except for `load` (reads the files). Nothing here opens key files or sockets.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.core import config as core
from appliance.core.config import (  # the appliance's own TOML reader, shared on purpose
    _NAME_RE,
    NOT_A_KEY,
    Destination,
    _Context,
    _dicom_keys,
    _file_of,
    _Table,
)
from appliance.core.errors import ConfigError

DEFAULT_CENTER_CONFIG = Path("/etc/appliance/center.toml")


@dataclass(frozen=True)
class Ingest:
    name: str  # the reading center, as receipts name it
    drop_dir: Path  # where appliances upload `<id>.bundle`
    key: Path  # the center's X25519 private key (PEM): opens the bundles
    signing_key: Path  # the center's Ed25519 private key (PEM): signs the receipts
    pacs: Destination  # transport "dicom"; name "pacs"
    state_dir: Path = Path("/var/lib/appliance-ingest")  # claimed/, done/, failed/, ingest.db
    poll_s: float = 5.0
    retry_min_s: float = 10.0
    retry_max_s: float = 600.0
    ae_title: str = "INGEST"  # calling AE title unless pacs.calling_ae_title is set
    max_instance_mb: int = 4096  # cap on any conversion's output for the PACS
    log_level: str = "info"
    log_format: str = "auto"


@dataclass(frozen=True)
class CenterConfig:
    ingest: Ingest
    sources: tuple[Path, ...] = field(default=(), metadata=NOT_A_KEY)
    origins: Mapping[str, Path] = field(default_factory=dict, compare=False, repr=False,
                                        metadata=NOT_A_KEY)

    def file_of(self, key: str) -> Path:
        return _file_of(self.origins, key, self.sources[0] if self.sources else DEFAULT_CENTER_CONFIG)


def is_center_config(data: Mapping[str, Any]) -> bool:
    """A center config has an [ingest] table and nothing of an appliance's."""
    return "ingest" in data and set(data) <= {"ingest"}


def _parse_pacs(t: _Table) -> Destination | None:
    if not t.valid:
        return None
    kw = _dicom_keys(t)
    t.finish()
    if any(v is None for k, v in kw.items() if k not in ("calling_ae_title", "tls", "commitment_port")):
        return None
    return Destination(name="pacs", transport="dicom", **kw)


def _parse_ingest(t: _Table) -> Ingest | None:
    d = Ingest  # class defaults
    kw: dict[str, Any] = {
        "name": t.string("name", max_len=63, pattern=_NAME_RE,
                         hint="must be 1..63 letters, digits, '.', '_' or '-', "
                              "starting with a letter or digit"),
        "drop_dir": t.path("drop_dir"),
        "key": t.path("key"),
        "signing_key": t.path("signing_key"),
        "state_dir": t.path("state_dir", d.state_dir),
        "poll_s": t.number("poll_s", d.poll_s, 0.1, 3600),
        "retry_min_s": t.number("retry_min_s", d.retry_min_s, 0.1, 86400),
        "retry_max_s": t.number("retry_max_s", d.retry_max_s, 1, 7 * 86400),
        "ae_title": t.ae("ae_title", d.ae_title),
        "max_instance_mb": t.integer("max_instance_mb", d.max_instance_mb, 1, 65536),
        "log_level": t.choice("log_level", d.log_level, ("debug", "info", "warning", "error")),
        "log_format": t.choice("log_format", d.log_format, ("auto", "json", "console")),
    }
    if t.valid and not t.has("pacs"):
        t.ctx.problem(t.key("pacs"), "is required: the [ingest.pacs] table (host, port, ae_title, "
                      "tls or plaintext = true)")
    pacs = _parse_pacs(t.table("pacs")) if t.has("pacs") else None
    t.finish()
    if kw["retry_min_s"] > kw["retry_max_s"]:
        t.ctx.problem(t.key("retry_min_s"), "must not be greater than ingest.retry_max_s")
    if pacs is None or any(v is None for v in kw.values()):
        return None
    return Ingest(pacs=pacs, **kw)


def parse(data: Mapping[str, Any], origins: Mapping[str, Path], main_file: Path,
          sources: tuple[Path, ...] = ()) -> CenterConfig:
    """Merged TOML data -> CenterConfig, or ConfigError listing every problem."""
    ctx = _Context(origins, main_file)
    top = _Table(dict(data), "", ctx)
    if not top.has("ingest"):
        ctx.problem("ingest", "is required: a center config is an [ingest] table")
    ingest = _parse_ingest(top.table("ingest"))
    top.finish()
    if ctx.problems or ingest is None:
        raise ConfigError(ctx.problems or [f"{main_file}: ingest: is not valid"])
    return CenterConfig(ingest=ingest, sources=sources or (main_file,), origins=dict(origins))


read = core.read  # the merged data of a config file and its drop-ins (either kind)


def load(path: Path | None = None) -> CenterConfig:
    """Read the center config file and its conf.d drop-ins and parse them."""
    data, origins, main, files = read(path or DEFAULT_CENTER_CONFIG)
    return parse(data, origins, main, files)


def effective(cfg: CenterConfig) -> dict[str, Any]:
    """The effective config as plain data (for `config check`): the pacs table shows the
    keys of a dicom destination only."""
    out = core.effective(core.Config(destinations=(cfg.ingest.pacs,)))
    pacs = out["destinations"][0]
    # Not keys of [ingest.pacs]: a bandwidth cap is for the appliance's WAN uplink, and the
    # center's PACS is on the center's own network.
    for k in ("name", "transport", *core.COMMON_DEST_KEYS):
        pacs.pop(k, None)
    ingest = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(cfg.ingest).items()
              if k != "pacs"}
    return {"sources": [str(s) for s in cfg.sources], "ingest": {**ingest, "pacs": pacs}}
