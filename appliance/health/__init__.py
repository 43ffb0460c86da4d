"""Health: systemd notify/watchdog, the local status socket, metrics, audit."""
