"""Write the image's software bill of materials (CycloneDX 1.5 JSON) to stdout.

Owns one thing: listing what a root file system has installed, with versions, from the
files the installers themselves keep: dpkg's status file (Debian packages) and the
`*.dist-info/METADATA` files of /opt/appliance/venv (Python distributions, the
appliance among them). Nothing is guessed: a package missing from those files is not
in the SBOM. Fails (exit 1, a message naming the file) when the status file or the venv
is missing. Stdlib only, so it runs with any Python 3.11 on the build host.

usage: sbom.py ROOT
"""

from __future__ import annotations

import email.parser
import json
import os
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import quote

VENV = Path("opt/appliance/venv")


def debian_packages(root: Path) -> list[dict[str, object]]:
    """Installed packages from var/lib/dpkg/status (paragraphs of `Field: value`)."""
    status = root / "var/lib/dpkg/status"
    out: list[dict[str, object]] = []
    for para in status.read_text(encoding="utf-8").split("\n\n"):
        fields = dict(line.split(": ", 1) for line in para.splitlines()
                      if ": " in line and not line.startswith(" "))
        if fields.get("Status", "").endswith(" installed") and "Package" in fields:
            name, version, arch = fields["Package"], fields["Version"], fields["Architecture"]
            out.append({"type": "library", "name": name, "version": version,
                        "purl": f"pkg:deb/debian/{name}@{quote(version)}?arch={arch}&distro=debian-12"})
    return out


def python_distributions(root: Path) -> list[dict[str, object]]:
    """Distributions installed in the venv, from their dist-info METADATA."""
    found = sorted((root / VENV / "lib").glob("python3*/site-packages/*.dist-info/METADATA"))
    if not found:
        raise FileNotFoundError(f"no Python distributions under {root / VENV}")
    out: list[dict[str, object]] = []
    for meta in found:
        msg = email.parser.Parser().parsestr(meta.read_text(encoding="utf-8"), headersonly=True)
        name, version = msg["Name"], msg["Version"]
        norm = name.lower().replace("_", "-").replace(".", "-")
        out.append({"type": "library", "name": name, "version": version,
                    "purl": f"pkg:pypi/{norm}@{quote(version)}"})
    return out


def sbom(root: Path) -> dict[str, object]:
    debs, wheels = debian_packages(root), python_distributions(root)
    app = next((w for w in wheels if w["name"] == "appliance"), None)
    stamp = int(os.environ.get("SOURCE_DATE_EPOCH", time.time()))
    return {
        "bomFormat": "CycloneDX", "specVersion": "1.5", "version": 1,
        "serialNumber": f"urn:uuid:{uuid.uuid4()}",
        "metadata": {
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stamp)),
            "component": {"type": "operating-system" if app is None else "firmware",
                          "name": "appliance-image",
                          "version": str(app["version"]) if app else "unknown"},
        },
        "components": [*debs, *wheels],
    }


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 64
    try:
        doc = sbom(Path(argv[1]))
    except (OSError, KeyError) as e:
        print(f"sbom: {e}", file=sys.stderr)
        return 1
    json.dump(doc, sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
