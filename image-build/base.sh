#!/bin/bash
# The Debian 12 base of the appliance's root file system: only Debian packages, no
# configuration of ours (build.sh adds that on a copy), so that build.sh can cache it
# in .cache/image/ under a hash of this file and rebuild it only when this file changes.
#
# usage: base.sh TARGET_DIR   (as root; needs mmdebstrap and Debian's mirror)
set -euo pipefail
target=$1
packages=(
  systemd systemd-sysv udev dbus kmod      # init; systemd-networkd is in systemd
  linux-image-amd64                         # with initramfs-tools (MODULES=most: virtio, NVMe, SATA, USB)
  python3 python3-venv                      # Python 3.11, the venv in /opt/appliance/venv
  rauc                                      # A/B updates (the D-Bus service files are ours: overlay/)
  grub-common                               # grub-editenv: RAUC's GRUB backend writes the grubenv with it
  wireguard-tools                           # wg: the VPN's handshake age (appliance-vpn-handshake.service)
  chrony                                    # NTP: the ops link's TLS and the audit trail need a true clock
)
# --variant=apt: Essential packages, apt and the list above, no Recommends (so no
# openssh-server, no editors, no man pages). No mirror named: Debian's default, with
# bookworm-updates and bookworm-security.
IFS=,
mmdebstrap --quiet --variant=apt --include="${packages[*]}" \
  --customize-hook='rm -rf "$1"/var/cache/apt/archives/*.deb "$1"/var/lib/apt/lists/*' \
  bookworm "$target"
