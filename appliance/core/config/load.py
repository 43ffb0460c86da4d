"""Reading the files: the main file, its conf.d drop-ins and the operations center's
remote.d drop-ins, merged key by key with the file that set each key recorded (`read`),
and which drop-in set what (`set_by`: `config check`'s "set by").

A file that cannot be read or is not TOML is a ConfigError naming it; the problems of
every file are reported together.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from appliance.core.config.base import DEFAULT_CONFIG, DROPIN_DIR, REMOTE_DIR, SITE_CONFIG_LINK
from appliance.core.config.tree import Config
from appliance.core.errors import ConfigError


def _merge(base: dict[str, Any], over: Mapping[str, Any], origins: dict[str, Path],
           src: Path, prefix: str = "") -> None:
    for k, v in over.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v, origins, src, key)
        else:
            # Drop what the replaced value recorded, then record the new one.
            for o in [o for o in origins if o == key or o.startswith((key + ".", key + "["))]:
                del origins[o]
            base[k] = v
            _record(v, key, origins, src)


def _record(v: Any, key: str, origins: dict[str, Path], src: Path) -> None:
    origins[key] = src
    if isinstance(v, dict):
        for k, sub in v.items():
            _record(sub, f"{key}.{k}", origins, src)
    elif isinstance(v, list):
        for i, sub in enumerate(v):
            _record(sub, f"{key}[{i}]", origins, src)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError([f"{path}: file not found"]) from None
    except PermissionError:
        raise ConfigError([f"{path}: permission denied"]) from None
    except IsADirectoryError:
        raise ConfigError([f"{path}: is a directory, not a file"]) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"{path}: not valid TOML: {e}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: not valid UTF-8"]) from None
    except OSError as e:
        raise ConfigError([f"{path}: cannot be read: {e.strerror}"]) from None


def _toml_files(d: Path) -> list[Path]:
    """`d/*.toml` by name. Hidden files (`.name.toml`, as editors and package managers
    leave behind) are not read, so a half-written copy never becomes configuration."""
    if not d.is_dir():
        return []
    return sorted((p for p in d.glob("*.toml") if p.is_file() and not p.name.startswith(".")),
                  key=lambda p: p.name)


def dropin_files(main: Path) -> list[Path]:
    """The technician's drop-ins of `main`, in the order they apply: `conf.d/*.toml` by name."""
    return _toml_files(main.parent / DROPIN_DIR)


def remote_dir(main: Path) -> Path:
    """Where the operations center's drop-ins of `main` live (ops/desired.py writes there).

    Fixed by the config's location, so that every reader finds the same folder without a
    setting (the daemon, `config check` in a technician's shell, the import, the records
    read before the config is): `remote.d` beside the main file; for an imported site
    config (`.../current/appliance.toml`, `current` the import's link) beside the link,
    i.e. `/data/config/remote.d`, because an import replaces the whole set `current`
    points to and must not drop the center's keys with it."""
    folder = main.absolute().parent
    if folder.name == SITE_CONFIG_LINK and folder.is_symlink():
        return folder.parent / REMOTE_DIR
    return folder / REMOTE_DIR


def remote_files(main: Path, remote: Path | None = None) -> list[Path]:
    """The operations center's drop-ins, in the order they apply (after `dropin_files`)."""
    return _toml_files(remote_dir(main) if remote is None else remote)


def read(path: Path, instead: Mapping[Path, dict[str, Any] | None] | None = None,
         remote: Path | None = None) -> tuple[dict[str, Any], dict[str, Path], Path, tuple[Path, ...]]:
    """The merged data of a config file, its conf.d drop-ins and then its remote drop-ins,
    which file set each key, the main file and every file read (any kind of config: the
    appliance's, a center's).

    `instead` maps a drop-in's path to the data to use for it (None: left out), whether
    the file exists or not: a candidate drop-in is checked as if it were in place
    (ops/desired.py) without being written first. `remote` names the remote folder
    instead of `remote_dir(path)` (the import checks a staged set with the one in force)."""
    main = path.absolute()
    rdir = remote_dir(main) if remote is None else remote.absolute()
    instead = dict(instead or {})
    added = [p for p, d in instead.items() if d is not None]
    local = {*dropin_files(main), *(p for p in added if p.parent != rdir)}
    far = {*remote_files(main, rdir), *(p for p in added if p.parent == rdir)}
    ordered = [*sorted(local, key=lambda p: p.name), *sorted(far, key=lambda p: p.name)]
    files = [main, *(f for f in ordered if f not in instead or instead[f] is not None)]
    data: dict[str, Any] = {}
    origins: dict[str, Path] = {}
    problems: list[str] = []
    for f in files:
        try:
            got = instead.get(f)
            _merge(data, got if got is not None else _read_toml(f), origins, f)
        except ConfigError as e:
            problems += e.problems
    if problems:
        raise ConfigError(problems)
    return data, origins, main, tuple(files)


def set_by(cfg: Config) -> dict[Path, list[str]]:
    """For every file but the main one: the keys it set, in the order read; a table as its
    keys (`queue.min_rate_kbit_s`), a list whole (`destinations`: a drop-in replaces a
    list whole). What `config check` shows, so that a technician sees which drop-in
    (theirs, the center's) won."""
    main = cfg.sources[0] if cfg.sources else DEFAULT_CONFIG
    out: dict[Path, list[str]] = {f: [] for f in cfg.sources if f != main}
    for key, f in cfg.origins.items():
        shown = key.split("[", 1)[0]
        if f in out and shown not in out[f]:
            out[f].append(shown)
    for f, keys in out.items():  # a table's own entry goes when its keys are there
        out[f] = [k for k in keys if not any(o.startswith(k + ".") for o in keys)]
    return out
