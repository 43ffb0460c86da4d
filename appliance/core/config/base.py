"""What every section of the config shares: where the files live (`DEFAULT_CONFIG`, the
site config, conf.d and remote.d), the table reader `_Table`, the problem list `_Context`
and the checks more than one section uses (AE titles, paths, IP addresses and networks).

`_Table` reads one TOML table: each key with its type and range, unknown keys reported
by `finish`. A check raises `_Bad` with what is wrong; `_Table` records it as
`FILE: dotted.key: message` in the `_Context` (the file that set the key, from the
origins) and goes on with the default, so that every problem is found in one pass.
Nothing here raises ConfigError: `tree.parse` does, with the whole list.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

DEFAULT_CONFIG = Path("/etc/appliance/appliance.toml")
# The site's config as `appliance config import` installs it (appliance/cli/config_import.py)
# on /data, where the image's read-only root leaves room for it: when it is there, it is
# the default instead of DEFAULT_CONFIG (which the image ships as its fallback).
SITE_CONFIG_DIR = Path("/data/config")
SITE_CONFIG_LINK = "current"  # SITE_CONFIG_DIR/current -> the installed set's folder
DROPIN_DIR = "conf.d"
# The operations center's drop-ins (ops/desired.py), read after conf.d: see `remote_dir`.
REMOTE_DIR = "remote.d"

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_HOST_RE = re.compile(r"^[A-Za-z0-9:.-]{1,253}$")  # a DNS name or an IP address
SECRET = {"secret": True}  # field metadata: `effective` prints it as ELIDED
ELIDED = "<elided>"
NOT_A_KEY = {"not_a_key": True}  # field metadata: bookkeeping, not settable in a file


_MISSING: Any = object()
Check = Callable[[str, Any], Any]


class _Table:
    """Reads one TOML table, recording problems against dotted keys; never raises."""

    def __init__(self, data: Any, path: str, ctx: _Context) -> None:
        self.prefix = path
        self.ctx = ctx
        self.used: set[str] = set()
        # A table that is not a table was reported once; its keys are not "required" too.
        self.valid = data is None or isinstance(data, dict)
        if not self.valid:
            ctx.problem(path, f"must be a table, not {_tname(data)}")
        self.data: dict[str, Any] = data if isinstance(data, dict) else {}

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def has(self, name: str) -> bool:
        return name in self.data

    def get(self, name: str, default: Any, check: Check) -> Any:
        self.used.add(name)
        if name not in self.data:
            return default
        try:
            return check(self.key(name), self.data[name])
        except _Bad as e:
            self.ctx.problem(self.key(name), str(e))
            return default

    def string(self, name: str, default: Any = _MISSING, *, max_len: int = 1024,
               pattern: re.Pattern[str] | None = None, hint: str = "") -> Any:
        def check(key: str, v: Any) -> str:
            if not isinstance(v, str):
                raise _Bad(f"must be a string, not {_tname(v)}")
            if not v:
                raise _Bad("must not be empty")
            if len(v) > max_len:
                raise _Bad(f"longer than {max_len} characters")
            if pattern and not pattern.match(v):
                raise _Bad(hint or f"must match {pattern.pattern}")
            return v
        return self._required(name, default, check)

    def integer(self, name: str, default: Any, lo: int, hi: int) -> Any:
        def check(key: str, v: Any) -> int:
            if isinstance(v, bool) or not isinstance(v, int):
                raise _Bad(f"must be an integer, not {_tname(v)}")
            if not lo <= v <= hi:
                raise _Bad(f"must be {lo}..{hi}")
            return v
        return self._required(name, default, check)

    def number(self, name: str, default: Any, lo: float, hi: float) -> Any:
        def check(key: str, v: Any) -> float:
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise _Bad(f"must be a number, not {_tname(v)}")
            if not lo <= v <= hi:  # also refuses nan
                raise _Bad(f"must be {lo:g}..{hi:g}")
            return float(v)
        return self._required(name, default, check)

    def boolean(self, name: str, default: bool) -> bool:
        def check(key: str, v: Any) -> bool:
            if not isinstance(v, bool):
                raise _Bad(f"must be true or false, not {_tname(v)}")
            return v
        return bool(self._required(name, default, check))

    def choice(self, name: str, default: Any, choices: tuple[str, ...]) -> Any:
        def check(key: str, v: Any) -> str:
            if not isinstance(v, str) or v not in choices:
                raise _Bad(f"must be one of {', '.join(choices)} (got {v!r})")
            return v
        return self._required(name, default, check)

    def path(self, name: str, default: Any = _MISSING) -> Any:
        def check(key: str, v: Any) -> Path:
            return _resolve(self.ctx, key, v)
        return self._required(name, default, check)

    def ae(self, name: str, default: Any = _MISSING) -> Any:
        def check(key: str, v: Any) -> str:
            return check_ae_title(v)
        return self._required(name, default, check)

    def table(self, name: str) -> _Table:
        self.used.add(name)
        return _Table(self.data.get(name), self.key(name), self.ctx)

    def tables(self, name: str) -> list[_Table]:
        """The entries of an array of tables; entries that are not tables are reported."""
        self.used.add(name)
        v = self.data.get(name, [])
        if not isinstance(v, list):
            self.ctx.problem(self.key(name), "must be an array of tables ([[...]])")
            return []
        out = []
        for i, item in enumerate(v):
            sub = _Table(item, f"{self.key(name)}[{i}]", self.ctx)
            if sub.valid and item is not None:
                out.append(sub)
        return out

    def _required(self, name: str, default: Any, check: Check) -> Any:
        if default is _MISSING and name not in self.data:
            self.used.add(name)
            if self.valid:
                self.ctx.problem(self.key(name), "is required")
            return None
        return self.get(name, None if default is _MISSING else default, check)

    def ignore_rest(self) -> None:
        """Mark every key as read (after a problem that makes them meaningless)."""
        self.used.update(self.data)

    def finish(self) -> None:
        for k in self.data:
            if k not in self.used:
                self.ctx.problem(self.key(k), "unknown key")


class _Bad(Exception):
    pass


def _file_of(origins: Mapping[str, Path], key: str, default: Path) -> Path:
    """The file that set `key`, or the nearest enclosing table or array entry."""
    k = key
    while k:
        if k in origins:
            return origins[k]
        k = re.sub(r"(\[\d+\]|\.[^.\[]+|^[^.\[]+)$", "", k)
    return default


class _Context:
    def __init__(self, origins: Mapping[str, Path], default_file: Path) -> None:
        self.origins = origins
        self.default_file = default_file
        self.problems: list[str] = []

    def file_of(self, key: str) -> Path:
        return _file_of(self.origins, key, self.default_file)

    def base_dir(self, key: str) -> Path:
        return self.file_of(key).parent

    def problem(self, key: str, msg: str) -> None:
        self.problems.append(f"{self.file_of(key)}: {key}: {msg}")


def _tname(v: Any) -> str:
    return {str: "a string", bool: "a boolean", int: "an integer", float: "a number",
            list: "an array", dict: "a table"}.get(type(v), type(v).__name__)


def check_ae_title(v: Any) -> str:
    """An AE title: 1..16 printable ASCII characters, no backslash, not only spaces."""
    if not isinstance(v, str):
        raise _Bad(f"must be a string, not {_tname(v)}")
    if len(v) > 16:
        raise _Bad("longer than 16 characters")
    if not v.strip():
        raise _Bad("must not be empty")
    if any(not (0x20 <= ord(c) < 0x7F) or c == "\\" for c in v):
        raise _Bad("may contain only printable ASCII characters and no backslash")
    return v.strip()


def _resolve(ctx: _Context, key: str, v: Any) -> Path:
    """A path from the config; a relative one is relative to the file that names it."""
    if not isinstance(v, str) or not v:
        raise _Bad(f"must be a non-empty path string, not {_tname(v)}")
    if "\x00" in v:
        raise _Bad("must not contain NUL")
    p = Path(v).expanduser()
    return Path(os.path.normpath(p if p.is_absolute() else ctx.base_dir(key) / p))


def _check_hosts(key: str, v: Any) -> tuple[str, ...]:
    if not isinstance(v, list) or not all(isinstance(h, str) for h in v):
        raise _Bad("must be an array of IP addresses or networks")
    out = []
    for h in v:
        try:
            net = ipaddress.ip_network(h, strict=False)
        except ValueError:
            raise _Bad(f"{h!r} is not an IP address or network "
                       "(like 10.1.2.3 or 10.1.2.0/24)") from None
        # A single address prints as the technician wrote it, not as 10.1.2.3/32.
        single = net.prefixlen == net.max_prefixlen
        out.append(str(net.network_address) if single else str(net))
    return tuple(out)


def _check_ip(key: str, v: Any) -> str:
    if not isinstance(v, str):
        raise _Bad(f"must be a string, not {_tname(v)}")
    try:
        ipaddress.ip_address(v)
    except ValueError:
        raise _Bad(f"{v!r} is not an IP address (use 0.0.0.0 for all IPv4 interfaces)") from None
    return v


def _check_path_list(ctx: _Context) -> Check:
    def check(key: str, v: Any) -> tuple[Path, ...]:
        if not isinstance(v, list):
            raise _Bad(f"must be an array of paths, not {_tname(v)}")
        return tuple(_resolve(ctx, f"{key}[{i}]", p) for i, p in enumerate(v))
    return check
