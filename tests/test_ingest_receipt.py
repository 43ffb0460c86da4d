"""Receipts (appliance/ingest/receipt.py) and the small pure pieces of ingest: signing and
checking a receipt, the verdict table, back-off, and which file names are bundles."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.ingest import receipt as receipts
from appliance.ingest.claim import bundle_id_of_claim, bundle_id_of_drop
from appliance.ingest.receipt import InstanceOutcome, Receipt, ReceiptError
from appliance.ingest.service import backoff_s

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
