"""Which transport sends to which kind of destination (`[[destinations]] transport`).

The daemon builds its transports here and nowhere else: `build(dest, context)`. Each
kind names the function that makes its transport, as "module:function", imported when
a destination of that kind is built. A new transport is one line here, its keys in
`core.config.TRANSPORT_KEYS`, and a module with `build(dest, context) -> Transport`;
tests/test_transport_contract.py runs the same conformance suite against each.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from appliance.bundle.format import PrivateKey
from appliance.core.config import Destination
from appliance.forward import Transport

# kind -> "module:function" making its Transport from (Destination, Context).
FACTORIES: dict[str, str] = {
    "directory": "appliance.forward.directory:build",
    "dicom": "appliance.forward.dicom:build",
    "sftp": "appliance.forward.sftp:build",
    "dicomweb": "appliance.forward.dicomweb:build",
}


@dataclass(frozen=True)
class Context:
    """What a transport needs of the appliance besides its own [[destinations]] table."""

    key: PrivateKey  # the appliance's private key: every bundle is verified as it is sent
    local_ae_title: str  # our AE title, the calling AE unless a destination sets its own
    max_instance_bytes: int  # receive.max_instance_mb: the cap on any conversion's output


def available() -> frozenset[str]:
    return frozenset(FACTORIES)


def factory(kind: str) -> Callable[[Destination, Context], Transport]:
    try:
        spec = FACTORIES[kind]
    except KeyError:
        raise LookupError(f"transport {kind!r} is not available in this version") from None
    module, _, name = spec.partition(":")
    made: Callable[[Destination, Context], Transport] = getattr(importlib.import_module(module), name)
    return made


def build(dest: Destination, context: Context) -> Transport:
    return factory(dest.transport)(dest, context)
