"""The WireGuard VPN ([vpn]): systemd-networkd sets the tunnel up from the files
`appliance vpn render` writes (netdev.py, pure), with a private key made on /data
(keys.py); the unprivileged daemon learns the handshake age from a file a small root
timer writes (handshake.py). docs/vpn.md is the technician's page."""
