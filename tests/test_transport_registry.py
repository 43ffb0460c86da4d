"""The registry builds every transport the config accepts, and only those."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.core import config, crypto
from appliance.core.config import Destination
from appliance.forward import registry


def test_every_transport_the_config_accepts_is_registered() -> None:
    accepted = set(config.TRANSPORT_KEYS) - set(config.UNAVAILABLE_TRANSPORTS)
    assert accepted == set(registry.available())


def test_build_makes_a_transport_named_after_its_destination(tmp_path: Path) -> None:
    crypto.create_keypair(tmp_path / "a.key", tmp_path / "a.pub")
    ctx = registry.Context(key=crypto.load_private_key(tmp_path / "a.key"), local_ae_title="EDGE",
                           max_instance_bytes=64 << 20)
    made = registry.build(Destination(name="out", transport="directory", path=tmp_path), ctx)
    assert made.name == "out"
    made = registry.build(Destination(name="pacs", transport="dicom", host="127.0.0.1", port=104,
                                      ae_title="PACS", plaintext=True), ctx)
    assert made.name == "pacs"
    made.close()
    made = registry.build(Destination(name="web", transport="dicomweb", url="http://127.0.0.1:8042/dicom-web",
                                      plaintext=True), ctx)
    assert made.name == "web"
    made.close()


def test_an_unknown_kind_is_a_lookup_error() -> None:
    with pytest.raises(LookupError, match="'carrier-pigeon' is not available"):
        registry.factory("carrier-pigeon")
