"""The dicom transport says whose fault a refusal is, so failover counts only the PACS's own.

A pynetdicom Storage SCP that takes only MR Image Storage (no Verification, no CT): it
answers every association request but accepts none of a CT bundle's contexts. That is
the instances' fault (parked, the destination kept), and the PACS answers a probe.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import MRImageStorage  # type: ignore[attr-defined]

from appliance.core.config import Destination
from appliance.forward import Permanent
from appliance.forward.dicom import DicomTransport
from tests.peers import free_port
from tests.test_transport_contract import KEY, make_bundle

pytestmark = pytest.mark.peers


@pytest.fixture
def mr_only() -> Iterator[DicomTransport]:
    ae = AE(ae_title="MRONLY")
    ae.add_supported_context(MRImageStorage)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False)
    t = DicomTransport(Destination(name="mr-only", transport="dicom", host="127.0.0.1", port=port,
                                   ae_title="MRONLY", plaintext=True, timeout_s=5.0), KEY)
    try:
        yield t
    finally:
        t.close()
        server.shutdown()


def test_a_pacs_that_takes_none_of_the_sop_classes_blames_the_instances(
        mr_only: DicomTransport, tmp_path: Path) -> None:
    bundle, _ = make_bundle(tmp_path / "b1.bundle")
    with pytest.raises(Permanent) as e:
        mr_only.send("b1", bundle, lambda n: None)
    assert e.value.instances == (0, 1, 2) and e.value.scope == "instance"
    assert "does not accept SOP class CT Image Storage" in str(e.value)


def test_a_pacs_without_verification_still_answers_a_probe(mr_only: DicomTransport) -> None:
    assert mr_only.probe() is True
