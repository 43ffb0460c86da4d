"""Receipts (appliance/ingest/receipt.py) and the small pure pieces of ingest: signing and
checking a receipt, the verdict table, back-off, which file names are bundles, and
`service.store` against the in-memory fake transport (tests/fake_transport.py)."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from appliance.bundle.format import BundleWriter, InstanceInfo, Manifest
from appliance.ingest import receipt as receipts
from appliance.ingest.claim import bundle_id_of_claim, bundle_id_of_drop, bundle_lock
from appliance.ingest.receipt import InstanceOutcome, Receipt, ReceiptError
from appliance.ingest.service import Delivery, backoff_s, store
from tests.fake_transport import FakeDestination, FakeTransport

KEY = Ed25519PrivateKey.generate()
SHA = "ab" * 32


def sample(verdict: str = "partial") -> Receipt:
    return Receipt("01a24e6b1c5e85b4", SHA, "rc-1", "2026-12-07T03:00:00Z", verdict,
                   (InstanceOutcome(0, "stored"),
                    InstanceOutcome(1, "failed", "permanent", "the PACS does not accept SOP class X")),
                   "1 of 2 instances not stored")


def test_a_signed_receipt_parses_back_to_what_was_signed() -> None:
    rec = sample()
    got = receipts.parse(receipts.sign(rec, KEY), [KEY.public_key()])
    assert got == Receipt(**{**vars(rec), "key_id": receipts.key_id(KEY.public_key())})
    assert got.stored == (0,)


def test_the_signature_covers_the_content_not_its_layout() -> None:
    doc = json.loads(receipts.sign(sample(), KEY))
    compact = json.dumps(doc, separators=(",", ":")).encode()
    assert receipts.parse(compact, [KEY.public_key()]).verdict == "partial"
    doc["verdict"] = "stored"
    with pytest.raises(ReceiptError, match="signature does not verify"):
        receipts.parse(json.dumps(doc).encode(), [KEY.public_key()])


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d.pop("signature"), "not signed"),
    (lambda d: d["signature"].update(key_id="00" * 8), "not trusted"),
    (lambda d: d["signature"].update(value="***"), "malformed"),
])
def test_an_unsigned_or_foreign_receipt_is_refused(change: object, message: str) -> None:
    doc = json.loads(receipts.sign(sample(), KEY))
    change(doc)  # type: ignore[operator]
    with pytest.raises(ReceiptError, match=message):
        receipts.parse(json.dumps(doc).encode(), [KEY.public_key()])


def test_a_receipt_with_an_invalid_field_is_refused_even_when_signed() -> None:
    bad = Receipt("01a2", SHA, "rc-1", "2026-12-07T03:00:00Z", "stored",
                  (InstanceOutcome(0, "stored", "permanent"),))
    with pytest.raises(ReceiptError, match="instance entry is invalid"):
        receipts.parse(receipts.sign(bad, KEY), [KEY.public_key()])
    bad = Receipt("../etc", SHA, "rc-1", "2026-12-07T03:00:00Z", "stored", ())
    with pytest.raises(ReceiptError, match="bundle_id"):
        receipts.parse(receipts.sign(bad, KEY), [KEY.public_key()])


def test_an_oversized_receipt_is_refused_before_it_is_parsed() -> None:
    with pytest.raises(ReceiptError, match="larger than"):
        receipts.parse(b" " * (receipts.MAX_RECEIPT + 1), [KEY.public_key()])


def test_write_makes_a_receipt_readable_by_others_despite_a_private_umask(tmp_path: Path) -> None:
    import os
    old = os.umask(0o077)
    try:
        p = receipts.write(tmp_path, "b-1", receipts.sign(sample(), KEY))
    finally:
        os.umask(old)
    assert p == tmp_path / "receipts" / "b-1.receipt.json"
    assert p.stat().st_mode & 0o777 == 0o644 and p.parent.stat().st_mode & 0o777 == 0o755
    assert [q.name for q in p.parent.iterdir()] == ["b-1.receipt.json"]  # no temp left


@pytest.mark.parametrize(("outcomes", "verdict"), [
    (("stored", "stored"), "stored"),
    (("stored", "failed"), "partial"),
    (("failed", "failed"), "failed"),
    ((), "failed"),
])
def test_the_verdict_follows_the_instance_outcomes(outcomes: tuple[str, ...], verdict: str) -> None:
    assert receipts.verdict_of([InstanceOutcome(i, o, "permanent" if o == "failed" else None)
                                for i, o in enumerate(outcomes)]) == verdict


def test_back_off_doubles_from_the_minimum_up_to_the_maximum() -> None:
    assert [backoff_s(n, 10, 600, lambda: 0.0) for n in (1, 2, 3, 7, 8, 100)] == [10, 20, 40, 600, 600, 600]
    assert backoff_s(3, 10, 600, lambda: 1.0) == 32  # up to 20 % earlier, never below the minimum
    assert backoff_s(1, 10, 600, lambda: 1.0) == 10


@pytest.mark.parametrize(("name", "bid"), [
    ("01a2.bundle", "01a2"), ("01a2.bundle.part", None), (".tmp-ab12", None),
    (".hidden.bundle", None), ("a b.bundle", None), ("x" * 65 + ".bundle", None),
])
def test_only_complete_bundles_with_safe_ids_are_taken_from_the_drop(name: str, bid: str | None) -> None:
    assert bundle_id_of_drop(name) == bid


def test_a_claim_name_gives_back_its_bundle_id() -> None:
    assert bundle_id_of_claim("01a2~9f3c2b.bundle") == "01a2"
    assert bundle_id_of_claim("01a2.bundle") is None


# --- store(): what the PACS's answers make of each instance ------------------------------------

CENTER = X25519PrivateKey.generate()


def bundle(tmp_path: Path, n: int = 4) -> tuple[Path, Manifest]:
    path = tmp_path / "b.bundle"
    with path.open("wb") as f:
        w = BundleWriter(f, "b-1", [CENTER.public_key()], "study-1")
        for i in range(n):
            raw = f"instance {i}".encode()
            w.begin_instance(InstanceInfo(
                sop_instance_uid=f"1.2.3.{i}", sop_class="1.2.840.10008.5.1.4.1.1.2",
                transfer_syntax="1.2.840.10008.1.2.1", received_transfer_syntax="1.2.840.10008.1.2.1",
                received_size=len(raw), received_sha256=hashlib.sha256(raw).hexdigest(),
                action="passthrough"))
            w.write(raw)
            w.end_instance()
        manifest = w.close()
    return path, manifest


def run_store(tmp_path: Path, dest: FakeDestination) -> Delivery:
    path, manifest = bundle(tmp_path)
    return store(FakeTransport("pacs", dest, CENTER), "b-1", path, manifest, lambda n: None,
                 threading.Event())


def test_store_reports_every_instance_stored(tmp_path: Path) -> None:
    d = run_store(tmp_path, FakeDestination())
    assert d.retry is None and [(o.index, o.outcome) for o in d.outcomes] == [(i, "stored") for i in range(4)]


def test_store_sets_refused_instances_aside_and_sends_the_rest(tmp_path: Path) -> None:
    dest = FakeDestination()
    dest.script = {"1.2.3.1": "refuse", "1.2.3.3": "refuse"}
    d = run_store(tmp_path, dest)
    assert [(o.index, o.outcome, o.status_class) for o in d.outcomes] == [
        (0, "stored", None), (1, "failed", "permanent"), (2, "stored", None), (3, "failed", "permanent")]
    assert d.outcomes[1].reason == "the fake PACS refused instance 1"
    assert dest.stored == {"1.2.3.0": 1, "1.2.3.2": 1}  # nothing stored twice


def test_store_leaves_the_bundle_for_a_retry_when_the_pacs_is_down(tmp_path: Path) -> None:
    dest = FakeDestination()
    dest.down = True
    d = run_store(tmp_path, dest)
    assert d.outcomes == () and d.retry == "the fake destination refused the connection"


def test_store_fails_a_bundle_that_does_not_verify_without_sending_anything(tmp_path: Path) -> None:
    path, manifest = bundle(tmp_path)
    data = bytearray(path.read_bytes())
    data[-5] ^= 1
    path.write_bytes(bytes(data))
    dest = FakeDestination()
    d = store(FakeTransport("pacs", dest, CENTER), "b-1", path, manifest, lambda n: None, threading.Event())
    assert (d.failed or "").startswith("bundle does not verify") and not dest.stored


def test_one_copy_of_a_bundle_id_at_a_time_and_the_lock_file_goes_with_its_holder(tmp_path: Path) -> None:
    with bundle_lock(tmp_path, "b-1") as first:
        assert first
        with bundle_lock(tmp_path, "b-1") as second, bundle_lock(tmp_path, "b-2") as other:
            assert not second and other
        assert [p.name for p in tmp_path.iterdir()] == ["b-1.lock"]
    assert list(tmp_path.iterdir()) == []
    with bundle_lock(tmp_path, "b-1") as again:
        assert again


class _Refusing:
    """A PACS that turns the association down for good (our AE title unknown)."""

    name = "pacs"

    def send(self, item_id: str, bundle: Path, progress: object, plan: object = None) -> None:
        from appliance.forward import Permanent
        raise Permanent("the PACS rejected the association: called AE title not recognized")

    def probe(self) -> bool:
        return True

    def close(self) -> None:
        pass


def test_a_pacs_refusing_the_whole_association_leaves_the_bundle_for_a_retry(tmp_path: Path) -> None:
    """Not the bundle's fault: failing it would need a human to drop it again once fixed."""
    path, manifest = bundle(tmp_path)
    d = store(_Refusing(), "b-1", path, manifest, lambda n: None, threading.Event())  # type: ignore[arg-type]
    assert d.outcomes == () and d.failed is None
    assert d.retry == ("the PACS refuses this bundle: "
                       "the PACS rejected the association: called AE title not recognized")
