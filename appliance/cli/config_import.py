"""`appliance config import SRC`: a technician's config, from the APPLCONFIG partition or
a USB stick (mounted at SRC), checked and installed atomically under /data.

What it owns: reading SRC (untrusted: a FAT stick anyone can write), staging the files in
the config dir, the check (`config check`'s: `config.load` + `config_cmds.check`, after
`keys init` for the new config, as the build and the first boot do), the atomic switch,
and the verdict written back to SRC as `appliance-result.txt` (and `box.csr`).

- Input: only `appliance.toml`, `conf.d/NAME.toml` and `certs/NAME.{pem,crt,pub,crl}`
  (NAME of letters, digits, `._-`; public material the config names relatively, such as
  `certs/reading-center.pub`, `certs/box.pem`; a private key is refused: keys are made on
  the box) are read; every other name is ignored. Each is a regular file (a symlink is
  refused: opened with O_NOFOLLOW), at most FILE_MAX bytes, at most DROPINS_MAX a folder.
- Layout of the config dir (`/data/config`): `site-<sha256 prefix>/` holds one set
  (`appliance.toml`, `conf.d/`, `certs/`), `current` is a symlink to the set in force (what the
  daemon reads: `config.default_path`), `previous` to the one before (kept for a manual
  rollback); others are removed. The switch is a rename of a new symlink over `current`
  (atomic; durable with the directory's fsync). A crash before it leaves the old set in
  force and a stale `site-*` folder the next import removes.
- Relative paths in the files resolve against `current/` once installed; the check runs
  on the staged folder, which `current` will point to, so it sees the same files.
- The operations center's remote drop-in (`config-dir/remote.d`, ops/desired.py) is not
  part of a set: an import keeps it, and it still wins over the stick's keys. So the
  check runs on the staged set *with* it (what the daemon will run), and the result file
  names it, its version and the keys it sets. A stick that holds CLEAR_REMOTE beside
  appliance.toml removes it (and any probation) when its set is installed: the check
  then runs without it, and the result file says `remote config: cleared`. This is how
  a technician on site sees and undoes a bad remote setting; the center can only bring
  one back with a newer version.
- Verdicts: INSTALLED (a new config is in force; `--changed-marker` is created so that
  the unit restarts the daemon), UNCHANGED (the files are the config in force), ALREADY
  IMPORTED (SRC's result file says these very files were imported before: they are not
  installed again, so that the APPLCONFIG partition read at every boot does not undo a
  later stick; deleting the result file imports them again), REFUSED (the check's lines;
  the config in force stays), NOTHING TO IMPORT (no appliance.toml).
- Exit codes: 0 for the first three and NOTHING TO IMPORT, 78 REFUSED by the check,
  65 REFUSED for the input itself (a symlink, a file too big), 73 the config dir cannot
  be written. A result file that cannot be written (a read-only stick) is a warning on
  stderr; the verdict stands.
- Concurrency: one import at a time (an flock on `config-dir/.lock`); the boot partition
  and a stick can be seen at the same moment.

No message names anything from the files but their names on SRC and the config check's
lines (which name keys and the technician's own values, never received data).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import errno
import fcntl
import hashlib
import os
import re
import shutil
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

from appliance.cli import identity
from appliance.cli.config_cmds import check
from appliance.cli.keys import audit_made, make_keys
from appliance.core import config, durable
from appliance.core.errors import EX_CANTCREAT, EX_CONFIG, EX_DATAERR, ConfigError, KeyFileError
from appliance.ops import desired

MAIN = "appliance.toml"
RESULT = "appliance-result.txt"
CSR = "box.csr"
FILE_MAX = 64 << 10
DROPINS_MAX = 32
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
CERTS = "certs"  # public material a config names relatively: certs/ca.pem, certs/center.pub
CERT_SUFFIXES = (".pem", ".crt", ".pub", ".crl")
CLEAR_REMOTE = "clear-remote-config.txt"  # on SRC: remove the center's remote drop-in
SITE_PREFIX = "site-"
PREVIOUS = "previous"

INSTALLED, UNCHANGED, ALREADY, REFUSED, NOTHING = (
    "INSTALLED", "UNCHANGED", "ALREADY IMPORTED", "REFUSED", "NOTHING TO IMPORT")


class InputProblem(Exception):
    """SRC holds something the import does not read (a symlink, a file too big)."""


def cmd_config_import(args: argparse.Namespace) -> int:
    src: Path = args.src
    cfg_dir: Path = args.config_dir
    try:
        durable.make_dirs(cfg_dir)
        lock = _locked(cfg_dir / ".lock")
    except OSError as e:
        print(f"error: cannot write the config dir {cfg_dir}: {e.strerror}", file=sys.stderr)
        return EX_CANTCREAT
    with lock:
        verdict, lines, code, candidate = _import(src, cfg_dir, args.systemd, args.unit_dir)
    if verdict == INSTALLED and args.changed_marker is not None:
        args.changed_marker.touch()
    _report(src, verdict, lines, candidate)
    return code


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


Verdict = tuple[str, list[str], int, bytes | None]


def _import(src: Path, cfg_dir: Path, systemd: bool, unit_dir: Path) -> Verdict:
    """(verdict, lines for the result file, exit code, the ops CSR made for the checked config)."""
    try:
        files = read_source(src)
    except InputProblem as e:
        return REFUSED, [f"config check: {e}"], EX_DATAERR, None
    if files is None:
        return NOTHING, [f"no {MAIN} here: nothing imported"], 0, None
    digest = source_digest(files)
    head = [f"source sha256: {digest}", "files: " + ", ".join(sorted(files))]
    site = cfg_dir / f"{SITE_PREFIX}{digest[:16]}"
    current = cfg_dir / config.SITE_CONFIG_LINK
    if current.is_symlink() and os.readlink(current) == site.name:
        return UNCHANGED, [*head, f"imported: {digest}", "the config in force already"], 0, None
    if imported_before(src) == digest:
        return ALREADY, [*head, f"imported: {digest}",
                         f"not imported again (delete {RESULT} to import these files again)"], 0, None
    clearing = CLEAR_REMOTE in files
    remote = cfg_dir / config.REMOTE_DIR
    _stage(site, files)
    # Checked with the remote drop-in the daemon will read too, unless this import clears it
    # (then with a remote folder that does not exist: none).
    problems, candidate = _check(site, systemd, unit_dir, remote if not clearing else site / ".no-remote")
    if problems:
        shutil.rmtree(site, ignore_errors=True)
        hint = ([f"config check: the config checked includes the operations center's remote"
                 f" config ({desired.paths_in(remote).dropin}); to import without it, put {CLEAR_REMOTE}"
                 f" beside {MAIN}"] if not clearing and desired.in_force(remote) else [])
        return REFUSED, [*head, *(f"config check: {p}" for p in problems), *hint], EX_CONFIG, candidate
    _switch(cfg_dir, site)
    done = [f"imported: {digest}", "config check: ok"]
    if clearing:
        try:
            cleared = desired.clear(remote)
        except OSError as e:  # the new set is in force; the remote drop-in still wins over it
            done.append(f"remote config: NOT cleared ({remote} cannot be written: {e.strerror})")
        else:
            done.append("remote config: cleared" + (f" (version {cleared})" if cleared else "")
                        if cleared is not None else "remote config: none to clear")
    return INSTALLED, [*head, *done], 0, candidate


def read_source(src: Path) -> dict[str, bytes] | None:
    """{name on SRC: bytes} of appliance.toml and conf.d/*.toml, or None without
    appliance.toml. Raises InputProblem for what is not read."""
    main = _read_file(src, MAIN)
    if main is None:
        return None
    files = {MAIN: main}
    clear = _read_file(src, CLEAR_REMOTE)
    if clear is not None:
        files[CLEAR_REMOTE] = clear
    files.update(_read_folder(src, config.DROPIN_DIR, (".toml",)))
    for name, data in _read_folder(src, CERTS, CERT_SUFFIXES).items():
        if b"PRIVATE KEY" in data:
            raise InputProblem(f"{name} holds a private key: keys are made on the box"
                               " ('appliance keys init'), never carried on a stick")
        files[name] = data
    return files


def _read_folder(src: Path, folder: str, suffixes: tuple[str, ...]) -> dict[str, bytes]:
    """{folder/name: bytes} of the files of SRC/folder with one of `suffixes` (in any
    case: it must then be lower case); hidden names are skipped, as config.dropin_files
    skips them, and so is every other name."""
    d = src / folder
    try:
        st = os.lstat(d)
    except FileNotFoundError:
        return {}
    if not stat.S_ISDIR(st.st_mode):
        raise InputProblem(f"{folder} is not a folder")
    with os.scandir(d) as it:
        names = sorted(e.name for e in it
                       if e.name.lower().endswith(suffixes) and not e.name.startswith("."))
    if len(names) > DROPINS_MAX:
        raise InputProblem(f"{folder} holds {len(names)} such files (at most {DROPINS_MAX})")
    out = {}
    for name in names:
        if not (NAME_RE.match(name) and name.endswith(suffixes)):
            raise InputProblem(f"{folder}/{name[:64]!r}: a name of letters, digits, '.', '_' and"
                               f" '-', ending in {' or '.join(suffixes)} (lower case)")
        data = _read_file(d, name)
        if data is not None:
            out[f"{folder}/{name}"] = data
    return out


def _read_file(folder: Path, name: str) -> bytes | None:
    """A regular file's bytes (at most FILE_MAX), None when absent; no symlinks."""
    shown = f"{folder.name}/{name}" if name != MAIN and name != RESULT else name
    try:
        fd = os.open(folder / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise InputProblem(f"{shown} is a symbolic link (not read)") from None
        raise InputProblem(f"{shown} cannot be read: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise InputProblem(f"{shown} is not a regular file")
        if st.st_size > FILE_MAX:
            raise InputProblem(f"{shown} is {st.st_size} bytes (at most {FILE_MAX})")
        data = f.read(FILE_MAX + 1)
    if len(data) > FILE_MAX:
        raise InputProblem(f"{shown} is more than {FILE_MAX} bytes")
    return data


def source_digest(files: dict[str, bytes]) -> str:
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(f"{name}\0{len(files[name])}\0".encode())
        h.update(files[name])
    return h.hexdigest()


def imported_before(src: Path) -> str | None:
    """The digest SRC's own result file says was imported from it, if any."""
    try:
        data = _read_file(src, RESULT)
    except InputProblem:
        return None
    for line in (data or b"").decode("utf-8", "replace").splitlines():
        if line.startswith("imported: "):
            return line.removeprefix("imported: ").strip()[:64]
    return None


def _stage(site: Path, files: dict[str, bytes]) -> None:
    shutil.rmtree(site, ignore_errors=True)  # a stale stage of the same files
    durable.make_dirs(site / config.DROPIN_DIR)
    durable.make_dirs(site / CERTS)
    for name, data in files.items():
        durable.atomic_write(site / name, data, mode=0o600)


def _check(site: Path, systemd: bool, unit_dir: Path, remote: Path) -> tuple[list[str], bytes | None]:
    """`config check`'s problem lines (file names as on SRC), and the ops CSR `keys init`
    made for the config (beside its certificate: in the staged folder when the config
    names it relatively, so it is read before a refused folder is removed).

    The keys the new config names are made first (`keys init`, audited as it audits
    them), as the first boot makes them: a new [operations] table gets its key and CSR
    even while its certificate is missing, so that the result file carries the CSR to
    the operations center."""
    def on_src(line: str) -> str:
        return line.replace(f"{site}/", "")
    try:
        cfg = config.load(site / MAIN, remote=remote)
    except ConfigError as e:
        return [on_src(p) for p in e.problems], None
    try:
        # audited as `keys init` audits them: on a first boot the import runs before
        # appliance-keys.service, which then finds every key there and records nothing
        audit_made(cfg, make_keys(cfg))
        found, _warnings = check(cfg, systemd, unit_dir)
    except (ConfigError, KeyFileError) as e:
        return [on_src(p) for p in getattr(e, "problems", [str(e)])], identity.csr_pem(cfg)
    return [on_src(f"{cfg.file_of(key)}: {key}: {msg}") for key, msg in found], identity.csr_pem(cfg)


def _switch(cfg_dir: Path, site: Path) -> None:
    """`current` -> site, atomically; the old target becomes `previous`; others go."""
    current = cfg_dir / config.SITE_CONFIG_LINK
    old = os.readlink(current) if current.is_symlink() else None
    _link(cfg_dir, site.name, current)
    if old is not None and old != site.name:
        _link(cfg_dir, old, cfg_dir / PREVIOUS)
    keep = {site.name, old}
    for p in cfg_dir.iterdir():
        if p.name.startswith(SITE_PREFIX) and p.name not in keep and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)


def _link(cfg_dir: Path, target: str, name: Path) -> None:
    tmp = cfg_dir / f"{durable.TEMP_PREFIX}{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    os.symlink(target, tmp)
    os.rename(tmp, name)
    durable.fsync_dir(cfg_dir)


def _in_force() -> tuple[config.Config | None, str]:
    path = config.default_path()
    try:
        return config.load(path), f"config in force: {path}"
    except ConfigError:
        return None, f"config in force: {path} (it does not load: run 'appliance config check')"


def result_text(verdict: str, lines: list[str],
                candidate_csr: bytes | None = None) -> tuple[str, bytes | None]:
    """The result file's text and the CSR: the config in force's identity; the CSR of
    the config in force, else of the checked one (made for it even when it was refused)."""
    cfg, in_force = _in_force()
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    out = [f"appliance config import: {verdict}", f"at: {now}", *lines, in_force,
           *remote_lines(config.remote_dir(config.default_path()))]
    if cfg is not None:
        out += identity.lines(cfg)
    csr = (identity.csr_pem(cfg) if cfg is not None else None) or candidate_csr
    if csr is not None:
        out += [f"ops center CSR (also as {CSR}):", *csr.decode("ascii", "replace").splitlines()]
    return "\r\n".join(out) + "\r\n", csr


def remote_lines(folder: Path) -> list[str]:
    """The operations center's remote drop-in in force, as a technician must see it: it
    wins over the stick's keys, and how to remove it."""
    r = desired.in_force(folder)
    if r is None:
        return ["remote config (operations center): none"]
    state = f"version {r['version']} applied" if r["version"] else "no version applied"
    if r["pending"] is not None:
        state += f", version {r['pending']} on probation"
    return [f"remote config (operations center): {r['file']} ({state}); it is kept by an import"
            f" and wins over these files for: {', '.join(r['keys']) or '(no keys)'}",
            f"remote config: to remove it, import a stick with {CLEAR_REMOTE} beside {MAIN}"]


def _report(src: Path, verdict: str, lines: list[str], candidate_csr: bytes | None) -> None:
    """The verdict on stdout (the console, in the image) and in SRC's result file."""
    text, csr = result_text(verdict, lines, candidate_csr)
    print(f"appliance config import: {verdict}")
    for line in lines:
        if line.startswith("config check: "):
            print(line)
    try:
        durable.atomic_write(src / RESULT, text.encode(), mode=0o644)
        if csr is not None:
            durable.atomic_write(src / CSR, csr, mode=0o644)
    except OSError as e:
        print(f"warning: cannot write {RESULT} on the config medium: {e.strerror}", file=sys.stderr)
