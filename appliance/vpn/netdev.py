"""The systemd-networkd files for [vpn] (pure: a Vpn in, file names and texts out).

Two files, fixed names, so that a render replaces what an earlier one wrote and a config
without [vpn] removes them: `60-appliance-vpn.netdev` (the WireGuard device: key file,
peer, endpoint, allowed IPs, keepalive, MTU) and `60-appliance-vpn.network` (the box's
tunnel addresses). They hold no secret (the private key stays in its file, which
networkd reads as the user systemd-network: keys.py), so they are written 0644.

Routes: networkd adds one route per allowed network to the main table
(`RouteTable=main`; without it only the addresses' own prefixes would be routed), so a
destination or the ops broker in a network behind the center's WireGuard server is
reached through the tunnel. A default route (0.0.0.0/0) is refused by the config: it
would also route the tunnel's own packets into the tunnel. The tunnel is not
`RequiredForOnline=`: the box receives images whether or not the center is reachable,
so boot (network-online.target) never waits for the VPN.
"""

from __future__ import annotations

from appliance.core.config import Vpn

NETDEV = "60-appliance-vpn.netdev"
NETWORK = "60-appliance-vpn.network"
FILES = (NETDEV, NETWORK)
HEADER = ("# Written by `appliance vpn render` from [vpn] of the appliance's config at each boot\n"
          "# (appliance-vpn.service); edit the config, not this file. docs/vpn.md.\n")


def render(vpn: Vpn) -> dict[str, str]:
    """The file name -> text of each networkd file for `vpn`."""
    peer = [f"PublicKey={vpn.peer_public_key}", f"Endpoint={vpn.endpoint}",
            *(f"AllowedIPs={net}" for net in vpn.allowed_ips)]
    if vpn.persistent_keepalive_s:
        peer.append(f"PersistentKeepalive={vpn.persistent_keepalive_s}")
    netdev = [
        "[NetDev]", f"Name={vpn.interface}", "Kind=wireguard", f"MTUBytes={vpn.mtu}",
        "Description=VPN to the reading center (appliance [vpn])", "",
        "[WireGuard]", f"PrivateKeyFile={vpn.private_key}", "RouteTable=main", "",
        "[WireGuardPeer]", *peer,
    ]
    network = [
        "[Match]", f"Name={vpn.interface}", "",
        "[Link]", "RequiredForOnline=no", "",
        "[Network]", *(f"Address={a}" for a in vpn.addresses),
        "LinkLocalAddressing=no", "IPv6AcceptRA=no",
    ]
    return {NETDEV: HEADER + "\n".join(netdev) + "\n", NETWORK: HEADER + "\n".join(network) + "\n"}
