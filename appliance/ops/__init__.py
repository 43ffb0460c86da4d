"""The ops link: the box's presence, state and events at the operations center over MQTT.

pki.py (the box's MQTT key and CSR, the fleet CA, the certificate checks), outbox.py
(events on disk until the broker acknowledges them), messages.py (the payloads, pure),
link.py (the MQTT client and its supervised publishing thread), commands.py (signed
commands: checked, run through the control socket's handlers, audited), cli.py
(`appliance fleet`).
Built only when the config has an [operations] table (daemon.py).
"""
