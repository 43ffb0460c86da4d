#!/bin/bash
# Makes a RAUC update bundle of a root file system image (`make update-bundle`: of the
# one `make image` built, image-build/out/rootfs.ext4).
#
#   verity format (signed hash tree: the box checks each block as it installs, and
#   refuses plain bundles: bundle-formats=-plain), compatible from overlay/etc/rauc/
#   system.conf (fixed per product), signed with RAUC_KEY/RAUC_CERT (by default the
#   development ones in .cache/rauc-keys/, made by rauc-keys.sh; a release build names
#   the release key and certificate) and checked against RAUC_KEYRING before it is kept.
#
# usage: update-bundle.sh ROOTFS.ext4 OUT.raucb VERSION
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
rootfs=$1 bundle=$2 version=$3
source "$here/steps/rauc.sh"
compatible=$(sed -n 's/^compatible=//p' "$here/overlay/etc/rauc/system.conf")
[ -n "$compatible" ] || { echo "no compatible= in overlay/etc/rauc/system.conf" >&2; exit 1; }
content=$(mktemp -d "${TMPDIR:-/tmp}/update-bundle.XXXXXX")
trap 'rm -rf "$content"' EXIT
cp --sparse=always "$rootfs" "$content/rootfs.ext4"
cat > "$content/manifest.raucm" <<MANIFEST
[update]
compatible=$compatible
version=$version
description=Teleradiology edge appliance root file system
build=$(date -u +%Y%m%dT%H%M%SZ)

[bundle]
format=verity

[image.rootfs]
filename=rootfs.ext4
MANIFEST
rm -f "$bundle"
# zstd: the guest kernel reads it; much faster to make than RAUC's default (xz). --conf:
# the image's system.conf, so that the signature is checked as the box checks it
# (check-purpose=codesign: the default purpose refuses a code-signing certificate).
rauc --conf="$here/overlay/etc/rauc/system.conf" bundle --cert="$RAUC_CERT" --key="$RAUC_KEY" --signing-keyring="$RAUC_KEYRING" \
  --mksquashfs-args="-comp zstd -Xcompression-level 6" "$content" "$bundle"
rauc --conf="$here/overlay/etc/rauc/system.conf" info --keyring="$RAUC_KEYRING" "$bundle" > /dev/null
