#!/bin/bash
# The Debian 12 root file system that tests/test_systemd_boot.py boots with systemd-nspawn:
# Debian's systemd and python3, the `appliance` system user, and /opt/appliance/venv with
# the appliance's dependencies installed from a wheelhouse built on the host (pip inside
# the chroot never downloads: --no-index). The appliance itself is installed per test
# run from a wheel of the checkout (tests/nspawn.py), so this tree only changes when the
# package list, this script or the dependency versions change; tests/nspawn.py caches it
# in .cache/nspawn/ under a hash of the three.
#
# usage: nspawn-rootfs.sh TARGET_DIR .../wheelhouse PACKAGES   (comma-separated; as root)
set -euo pipefail
target=$1
wheels=$2
packages=$3
[ "$(basename "$wheels")" = wheelhouse ] || { echo "the wheel folder must be named wheelhouse" >&2; exit 64; }

# No mirror named: mmdebstrap uses Debian's default one, with updates and security.
mmdebstrap --quiet --variant=apt --include="$packages" \
  --customize-hook='chroot "$1" useradd --system --user-group --home-dir /var/lib/appliance --no-create-home --shell /usr/sbin/nologin appliance' \
  --customize-hook="copy-in $wheels /opt" \
  --customize-hook='chroot "$1" env -i PATH=/usr/bin:/bin python3 -m venv /opt/appliance/venv' \
  --customize-hook='chroot "$1" env -i PATH=/usr/bin:/bin /opt/appliance/venv/bin/pip install --quiet --no-index --find-links /opt/wheelhouse appliance' \
  --customize-hook='rm -rf "$1"/opt/wheelhouse "$1"/var/cache/apt/archives/*.deb "$1"/var/lib/apt/lists/*' \
  bookworm "$target"
