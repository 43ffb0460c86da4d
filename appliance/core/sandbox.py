"""What the systemd unit lets the daemon write, and the drop-in that widens it.

`systemd/appliance.service` runs the daemon with `ProtectSystem=strict`: the whole file
system is read-only to it except `/var/lib/appliance` (`UNIT_WRITABLE`, checked against
the unit file by a test). A `state_dir` elsewhere, or a directory destination elsewhere
(a NAS share, a second disk), therefore fails with EROFS under the unit although the
same config works from a shell. And `PrivateTmp=`/`ProtectHome=` give the daemon its own
empty /tmp and hide /home: a destination there would write where nobody looks, or fail.

This module owns the table of those rules (pure: `needed`, `problems`, `dropin_text`,
`parse_read_write_paths`) and two small I/O edges: reading the installed drop-ins
(`granted`) and asking whether a path is on a read-only mount right now (`read_only`).
The drop-in it describes is `/etc/systemd/system/appliance.service.d/paths.conf`; the CLI
prints or writes it (`appliance config systemd-dropin`) and `config check` names it when
it is missing. Nothing here runs systemctl: after writing, the operator reloads.

Messages name config keys, paths from the config and unit settings, never received data.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from appliance.core.config import Config

UNIT_NAME = "appliance.service"
# ReadWritePaths= of the unit (remote.d: ops/desired.py writes the remote drop-in there,
# config.remote_dir of the unit's --config; the image's drop-in adds /data/config/remote.d)
UNIT_WRITABLE: tuple[Path, ...] = (Path("/var/lib/appliance"), Path("/etc/appliance/remote.d"))
# Folders the unit replaces or hides whatever the drop-ins say, and why.
UNIT_HIDDEN: dict[Path, str] = {
    Path("/tmp"): "PrivateTmp=yes gives the appliance its own empty /tmp",  # noqa: S108
    Path("/var/tmp"): "PrivateTmp=yes gives the appliance its own empty /var/tmp",  # noqa: S108
    Path("/home"): "ProtectHome=yes hides it",
    Path("/root"): "ProtectHome=yes hides it",
    Path("/run/user"): "ProtectHome=yes hides it",
}
UNIT_DIR = Path("/etc/systemd/system")  # where the administrator's units and drop-ins live
UNIT_SEARCH = (UNIT_DIR, Path("/usr/lib/systemd/system"), Path("/lib/systemd/system"))
DROPIN_NAME = "paths.conf"

_RW_LINE = re.compile(r"^\s*ReadWritePaths\s*=\s*(.*?)\s*$")


def dropin_dir(unit_dir: Path = UNIT_DIR) -> Path:
    return unit_dir / f"{UNIT_NAME}.d"


def dropin_path(unit_dir: Path = UNIT_DIR) -> Path:
    return dropin_dir(unit_dir) / DROPIN_NAME


def needed(cfg: Config) -> list[tuple[str, Path]]:
    """(dotted key, path) for every folder the daemon must be able to write."""
    out = [("appliance.state_dir", cfg.appliance.state_dir)]
    out += [(f"destinations[{i}].path", d.path) for i, d in enumerate(cfg.destinations)
            if d.transport == "directory" and d.path is not None]
    return out


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def hidden(cfg: Config) -> list[tuple[str, str]]:
    """(dotted key, problem) for every folder the unit hides from the daemon whatever its
    drop-ins say."""
    out = []
    for key, path in needed(cfg):
        folder = next((f for f in UNIT_HIDDEN if _within(path, f)), None)
        if folder is not None:
            out.append((key, f"{path} is inside {folder}, which the systemd unit {UNIT_NAME} does not"
                        f" share with the appliance ({UNIT_HIDDEN[folder]}); choose a folder"
                        " elsewhere"))
    return out


def problems(cfg: Config, granted_paths: tuple[Path, ...], dropin: Path) -> list[tuple[str, str]]:
    """(dotted key, problem) for every folder the unit (with `granted_paths` from its
    drop-ins) would not let the daemon write."""
    writable = UNIT_WRITABLE + granted_paths
    out = hidden(cfg)
    hidden_keys = {key for key, _ in out}
    for key, path in needed(cfg):
        if key not in hidden_keys and not any(_within(path, w) for w in writable):
            out.append((key, f"{path} is read-only for the appliance under the systemd unit"
                        f" {UNIT_NAME} (ProtectSystem=strict; it may write only"
                        f" {', '.join(str(w) for w in writable)}): write the drop-in {dropin} with"
                        " `appliance config systemd-dropin --write`, then run `systemctl"
                        " daemon-reload` and `systemctl restart appliance`"))
    return out


def _quote(path: Path) -> str:
    """A path as one systemd word: quoted, `%` doubled (unit specifiers), `-` so that a
    share not mounted yet when the unit starts does not stop the unit (the forwarder
    reports it instead)."""
    s = str(path).replace("%", "%%").replace("\\", "\\\\").replace('"', '\\"')
    return f'"-{s}"'


def unit_safe(path: Path) -> bool:
    """A path a unit file can carry: no control characters (a newline would end the
    setting and start another)."""
    return not any(ord(c) < 0x20 or ord(c) == 0x7F for c in str(path))


def dropin_text(cfg: Config) -> str:
    """The drop-in that lets the daemon write every folder of `needed` outside the unit's
    own writable set (hidden folders are left out: a drop-in cannot make them work)."""
    source = cfg.sources[0] if cfg.sources else "the appliance config"
    lines = [
        f"# Written by `appliance config systemd-dropin` from {source}.",
        "# The folders outside /var/lib/appliance that the appliance must write; regenerate",
        "# it after changing appliance.state_dir or a directory destination, then run",
        "# `systemctl daemon-reload` and `systemctl restart appliance`.",
        "[Service]",
    ]
    seen: set[Path] = set()
    for _key, path in needed(cfg):
        if any(_within(path, w) for w in UNIT_WRITABLE + tuple(seen)):
            continue
        if any(_within(path, h) for h in UNIT_HIDDEN) or not unit_safe(path):
            continue
        seen.add(path)
        lines.append(f"ReadWritePaths={_quote(path)}")
    return "\n".join(lines) + "\n"


def parse_read_write_paths(text: str) -> list[Path]:
    """The paths of the `ReadWritePaths=` lines of a unit file or drop-in.

    Enough of systemd's syntax for the files we write and a hand-edited one: words
    split on whitespace, double quotes, the `-` and `+` prefixes, `%%`; an empty
    assignment resets the list, as it does in systemd.
    """
    out: list[Path] = []
    for line in text.splitlines():
        m = _RW_LINE.match(line)
        if not m:
            continue
        words = _split_words(m.group(1))
        if not words:
            out.clear()
            continue
        for w in words:
            w = w.lstrip("-+").replace("%%", "%")
            if w.startswith("/"):
                out.append(Path(os.path.normpath(w)))
    return out


def _split_words(value: str) -> list[str]:
    words: list[str] = []
    for m in re.finditer(r'"((?:[^"\\]|\\.)*)"|(\S+)', value):
        if m.group(1) is not None:
            words.append(re.sub(r"\\(.)", r"\1", m.group(1)))
        else:
            words.append(m.group(2))
    return words


def granted(unit_dir: Path = UNIT_DIR) -> tuple[Path, ...]:
    """The ReadWritePaths= of every `*.conf` drop-in of the unit installed under `unit_dir`."""
    d = dropin_dir(unit_dir)
    if not d.is_dir():
        return ()
    out: list[Path] = []
    for f in sorted(d.glob("*.conf")):
        try:
            out += parse_read_write_paths(f.read_text(encoding="utf-8", errors="replace"))
        except OSError:
            continue  # unreadable: it grants nothing we can vouch for
    return tuple(out)


def unit_installed(dirs: tuple[Path, ...] = UNIT_SEARCH) -> bool:
    return any((d / UNIT_NAME).exists() for d in dirs)


def read_only(path: Path) -> bool:
    """Whether `path`, or the nearest folder above it that exists, is on a read-only
    mount in this process's view (under the unit: outside its writable paths)."""
    p = path
    while True:
        try:
            return bool(os.statvfs(p).f_flag & os.ST_RDONLY)
        except FileNotFoundError:
            if p.parent == p:
                return False
            p = p.parent
        except OSError:
            return False  # not ours to judge here (permission): the daemon reports it


def unit_lines(name: str, unit_dirs: tuple[Path, ...] = UNIT_SEARCH
               ) -> tuple[Path, list[tuple[Path, str]]] | None:
    """An installed unit's file (the first found in `unit_dirs`, /etc first) and its lines
    as systemd reads them: the file's, then its `*.conf` drop-ins' by name, a drop-in in an
    earlier folder hiding one of the same name in a later one; each line with its file.
    None when the unit is not installed; an unreadable file is skipped (it sets nothing we
    can vouch for)."""
    unit = next((d / name for d in unit_dirs if (d / name).is_file()), None)
    if unit is None:
        return None
    dropins = {f.name: f for d in reversed(unit_dirs) for f in (d / f"{name}.d").glob("*.conf")}
    out: list[tuple[Path, str]] = []
    for f in [unit, *(dropins[n] for n in sorted(dropins))]:
        try:
            text = f.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        out.extend((f, line) for line in text.splitlines())
    return unit, out
