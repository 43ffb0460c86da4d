"""`python -m appliance.vpn render --out DIR [--config PATH]`: `appliance vpn render`
without importing the whole command line (boot.py says why). Errors as the CLI's: one
line per problem on stderr, exit 78 for the config or the key, 64 for usage."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from appliance.core.errors import EX_USAGE, ApplianceError, ConfigError
from appliance.vpn import boot


def main(argv: list[str] | None = None) -> int:
    os.umask(0o077)  # as `appliance`: nothing made here is for others unless chmod says so
    p = argparse.ArgumentParser(prog="python -m appliance.vpn", exit_on_error=False)
    p.add_argument("cmd", choices=["render"])
    p.add_argument("--config", type=Path, default=None)
    p.add_argument("--out", type=Path, required=True)
    try:
        args = p.parse_args(argv)
    except argparse.ArgumentError as e:
        print(f"{p.prog}: {e}", file=sys.stderr)
        return EX_USAGE
    except SystemExit as e:  # --help (0), or a missing argument (argparse printed why)
        return EX_USAGE if e.code else 0
    try:
        print("\n".join(boot.render(args.config, args.out)))
    except ConfigError as e:
        for line in e.problems:
            print(f"config error: {line}", file=sys.stderr)
        return e.exit_code
    except ApplianceError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
