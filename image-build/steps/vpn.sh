#!/bin/bash
# The VPN's part of the image (docs/vpn.md), called by build.sh on root A:
# appliance-vpn.service (renders [vpn] for systemd-networkd at boot) and the handshake
# timer enabled; both units as the image has them pass `systemd-analyze verify` (prints
# nothing) and score at most VPN_SECURITY_MAX in the offline security review (they run
# as root, for one capability each: CAP_CHOWN, CAP_NET_ADMIN).
#
# usage: steps/vpn.sh ROOT
set -euo pipefail
root=$1
VPN_SECURITY_MAX=20  # tenths (2.0), as our other units; measured 1.2 and 1.4
[ -x "$root/usr/bin/wg" ] || { echo "wireguard-tools (wg) is not in the image (base.sh)" >&2; exit 1; }
systemctl --root="$root" enable appliance-vpn.service appliance-vpn-handshake.timer
for unit in appliance-vpn.service appliance-vpn-handshake.service appliance-vpn-handshake.timer; do
  said=$(systemd-analyze verify --root="$root" "$unit" 2>&1)
  [ -z "$said" ] || { echo "$said"; echo "systemd-analyze verify: $unit" >&2; exit 1; }
done
for unit in appliance-vpn.service appliance-vpn-handshake.service; do
  out=$(mktemp)
  systemd-analyze security --offline=yes --root="$root" --threshold=$VPN_SECURITY_MAX "$unit" > "$out" ||
    { tail -3 "$out"; rm -f "$out"; echo "$unit scores above $VPN_SECURITY_MAX/10 (systemd-analyze security)" >&2; exit 1; }
  echo "  $unit: $(grep -o 'exposure level.*' "$out")"
  rm -f "$out"
done
