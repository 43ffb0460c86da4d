"""A/B updates of the appliance image with RAUC (docs/updates.md).

`appliance update FILE` (cli/update.py) installs a signed bundle into the inactive slot
with `rauc install`, records the trial (trial.py), and reboots once no association or
delivery holds the update lock (lock.py). At the next boot `appliance update gate`
(the mark-good unit, appliance-update-gate.service) watches the daemon and keeps the new
slot only if the health gate passes (gate.py, a pure table); otherwise it marks the slot
bad and reboots into the old one. rauc.py is the only place that runs `rauc`.
"""
