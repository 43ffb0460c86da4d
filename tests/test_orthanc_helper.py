"""The Orthanc test helper itself: start it, C-STORE one file with DCMTK, find it over REST."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.orthanc import Orthanc
from tests.peers import storescu

pytestmark = pytest.mark.peers


def test_orthanc_receives_a_file_from_storescu(tmp_path: Path, samples: Path) -> None:
    src = sorted((samples / "series" / "CT_Philips_Ingenuity_phantom_28sl").iterdir())[0]
    sop_uid = str(dcmread(src, stop_before_pixels=True).SOPInstanceUID)
    pacs = Orthanc(tmp_path / "orthanc")
    try:
        pacs.start()
        assert pacs.count() == 0
        r = storescu(pacs.dicom_port, [src], called="ORTHANC")
        assert r.returncode == 0, r.stderr
        assert pacs.wait_count(1) == 1
        oid = pacs.find_instance(sop_uid)
        assert oid is not None and pacs.instances() == [oid]
        assert pacs.instance_tags(oid)["SOPInstanceUID"] == sop_uid
        stored = dcmread(io.BytesIO(pacs.instance_file(oid)))
        assert stored.SOPInstanceUID == sop_uid
        assert stored.PixelData == dcmread(src).PixelData
    finally:
        assert pacs.stop() is not None
    assert pacs.proc is not None and pacs.proc.poll() is not None
