"""Writes the tables of docs/conformance-statement.md from the code that decides them.

    python docs/gen_conformance.py           rewrite the generated blocks in place
    python docs/gen_conformance.py --check   exit 1, naming each stale block, if the file
                                             is not what this script would write

The statement is prose written by hand, with tables between the markers
`<!-- generated: NAME -->` and `<!-- end: NAME -->`. Only those blocks are written here,
each from the table or default in the code that decides it (the receive status table,
pynetdicom's storage SOP classes, the codecs, the forward status tables, config defaults
read through the real parser, the implementation identifiers), so a change in the code
that the statement does not follow fails `tests/test_conformance_statement.py`, which
runs `--check` and also holds the tables against a running daemon.

Adding a row:
- a receive setting (a field of `config.Receive`): add it to `RECEIVE_SETTINGS`, or to
  `NOT_ASSOCIATION_SETTINGS` with the reason; the test fails until one of them has it;
- a reason the Receive AE rejects an association with: `SCP_REJECTIONS`;
- a C-STORE status the Receive AE returns: `receive.scp.STATUS` itself (read here);
then run this script and commit the document with the change.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from io import BytesIO
from pathlib import Path

import pynetdicom
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    AllTransferSyntaxes,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import (
    AE,
    DEFAULT_TRANSFER_SYNTAXES,
    PYNETDICOM_IMPLEMENTATION_UID,
    sop_class,
)
from pynetdicom.sop_class import _STORAGE_CLASSES  # what the unrestricted SCP calls storage

from appliance import __version__
from appliance.core import config
from appliance.forward.dicom import contexts, status
from appliance.forward.dicom.contexts import STORAGE_COMMITMENT_PUSH, UNCOMPRESSED
from appliance.pack.codec import CODECS
from appliance.receive.identify import part10_header
from appliance.receive.scp import STATUS

DOC = Path(__file__).resolve().parent / "conformance-statement.md"
BLOCK_RE = re.compile(r"(<!-- generated: ([\w-]+) -->\n)(.*?)(<!-- end: \2 -->)", re.S)

VERIFICATION = UID("1.2.840.10008.1.1")
# What pack does with an instance depends on its transfer syntax (pack/codec.py
# `_dataset_bytes`): these three are native little endian and are compressed when the
# image allows it; every other syntax is kept as received.
NATIVE_LITTLE_ENDIAN = (ImplicitVRLittleEndian, ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian)
# The version name the Receive AE sends (receive/scp.py `Receiver.__init__`).
SCP_VERSION_NAME = f"APPLIANCE_{__version__}"[:16]

# Receive settings that shape associations: (key under [receive], what it sets, unit).
RECEIVE_SETTINGS: tuple[tuple[str, str, str], ...] = (
    ("ae_title", "the Receive AE's title (the called AE title modalities use)", ""),
    ("bind", "the address the plain listener binds to (IPv4 or IPv6)", ""),
    ("port", "the plain (unencrypted) DICOM port", ""),
    ("plain", "whether the plain listener runs at all", ""),
    ("tls.port", "the DICOM TLS port (only with a [receive.tls] block)", ""),
    ("tls.bind", "the address the TLS listener binds to", ""),
    ("tls.require_client_cert", "TLS peers must present a certificate signed by tls.ca", ""),
    ("accept_any_caller", "accept any calling AE title (only on a closed network)", ""),
    ("callers", "the calling AE titles allowed, each optionally limited to hosts", ""),
    ("max_associations", "associations open at once; one more is rejected", ""),
    ("max_connections", "TCP connections at once, before any association (the oldest one"
                        " without an association is closed to let a new one in)", ""),
    ("max_connections_per_host", "TCP connections at once from one source address; one more"
                                 " is closed at once", ""),
    ("check_called_ae", "reject an association whose called AE title is not ae_title", ""),
    ("max_pdu", "maximum PDU length the Receive AE accepts (sent in A-ASSOCIATE-AC)", "bytes"),
    ("acse_timeout_s", "time allowed for association negotiation and release", "s"),
    ("dimse_timeout_s", "time allowed for a DIMSE message to arrive", "s"),
    ("network_timeout_s", "an association idle this long is aborted", "s"),
    ("max_instance_mb", "the largest data set accepted, also once inflated (deflated syntaxes)",
     "MiB"),
)
# Settings without a default, and what the table says instead.
SHOWN_INSTEAD = {"callers": "none: at least one is required unless accept_any_caller = true",
                 "tls.bind": "receive.bind"}
# Fields of config.Receive that are not association policy, and why.
NOT_ASSOCIATION_SETTINGS: dict[str, str] = {
    "in_memory_limit_mb": "memory use: larger data sets are sealed to disk as they arrive",
    "tls": "a table; its keys are listed one by one",
    "tls.cert": "a file: section 7.1",
    "tls.key": "a file: section 7.1",
    "tls.ca": "a file: section 7.1",
}

# Why the Receive AE rejects an association: (result, source, reason, when, decided by).
SCP_REJECTIONS: tuple[tuple[int, int, int, str, str], ...] = (
    (1, 1, 3, "the calling AE title is not in receive.callers, or the peer's address is not in"
              " its hosts (unless receive.accept_any_caller = true)",
     "receive/scp.py `Receiver._on_requested`"),
    (1, 1, 7, "the called AE title is not receive.ae_title (unless receive.check_called_ae ="
              " false)", "receive/scp.py `association_refusal`"),
    (2, 3, 2, "receive.max_associations associations are already open",
     "pynetdicom (`AE.maximum_associations`)"),
)

# What the forwarder does with a bundle for each outcome (the prose above the tables
# says what "retried" and "parked" mean).
OUTCOME_TEXT = {
    status.Outcome.SUCCESS: "delivered",
    status.Outcome.WARNING: "delivered, logged as a warning",
    status.Outcome.RETRY: "retried",
    status.Outcome.PERMANENT: "instance parked, with the reason",
}
RESULT_TEXT = {1: "rejected-permanent", 2: "rejected-transient"}
SOURCE_TEXT = {1: "service-user", 2: "service-provider (ACSE)", 3: "service-provider (presentation)"}


# --- markdown ---------------------------------------------------------------------------


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    def cell(v: str) -> str:
        return v.replace("|", "\\|")

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n" + "\n".join(lines) + "\n\n"  # blank lines: a table, not part of the comment


def code(v: object) -> str:
    return f"`{v}`"


def hex4(n: int) -> str:
    return f"0x{n:04X}"


# --- defaults, read through the real parser -------------------------------------------


def receive_defaults() -> config.Receive:
    """The defaults, through the parser; with a [receive.tls] block (its keys have
    defaults only there) and the one caller a config needs (shown as SHOWN_INSTEAD)."""
    tls = {"cert": "c.pem", "key": "k.pem", "ca": "ca.pem"}
    receive = {"callers": [{"ae_title": "CT"}], "tls": tls}
    return config.parse({"receive": receive}, {}, Path("/x/appliance.toml")).receive


def dicom_destination_defaults() -> config.Destination:
    dest = {"name": "pacs", "transport": "dicom", "host": "pacs.example", "ae_title": "PACS",
            "plaintext": True}
    cfg = config.parse({"receive": {"accept_any_caller": True}, "destinations": [dest]}, {},
                       Path("/x/appliance.toml"))
    return cfg.destinations[0]


def value_of(obj: object, dotted: str) -> object:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def shown(v: object, unit: str) -> str:
    if isinstance(v, bool):
        return code(str(v).lower())
    if v in ((), None):
        return "none"
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    return code(v) + (f" {unit}" if unit else "")


# --- the blocks -------------------------------------------------------------------------


def block_version() -> str:
    return (f"\nEdge appliance version {code(__version__)}, with pynetdicom"
            f" {code(pynetdicom.__version__)} (its implementation identifiers, table 4.2.1-3,"
            " change with it).\n\n")


def stored_file_meta() -> Dataset:
    """The File Meta Information the Receive AE writes before a received data set."""
    head = part10_header("1.2.840.10008.5.1.4.1.1.7", "1.2.3", str(ExplicitVRLittleEndian), "MODALITY")
    return dcmread(BytesIO(head)).file_meta


def block_implementation() -> str:
    scu = AE()  # the Forward AE and the commitment listener keep pynetdicom's identifiers
    meta = stored_file_meta()
    return table(("AE", "Implementation Class UID", "Implementation Version Name"), (
        ("Receive AE (SCP)", code(PYNETDICOM_IMPLEMENTATION_UID), code(SCP_VERSION_NAME)),
        ("Forward AE (SCU) and its commitment listener", code(scu.implementation_class_uid),
         code(scu.implementation_version_name)),
        ("File Meta of each stored instance, (0002,0012) and (0002,0013)",
         code(meta.ImplementationClassUID), code(meta.ImplementationVersionName)),
    ))


def block_scp_sop_classes() -> str:
    rows = [("Verification", code(VERIFICATION), "SCP")]
    rows += [(class_name(kw, uid), code(uid), "SCP") for kw, uid in _STORAGE_CLASSES.items()]
    rows.append(("Any private SOP class, or one not in this list", "(any)", "SCP"))
    return table(("SOP Class Name", "SOP Class UID", "Role"), rows)


def class_name(keyword: str, uid: str) -> str:
    """pydicom's name for a SOP class; for one newer than pydicom's dictionary, the
    pynetdicom keyword spelt out ("PhotoacousticImageStorage" -> "Photoacoustic Image Storage")."""
    name = UID(uid).name
    return name if name != uid else re.sub(r"(?<=[a-z])(?=[A-Z])", " ", keyword)


def other_classes_accepted() -> list[tuple[str, str]]:
    """(pynetdicom name, UID) of the known SOP classes of other services that pynetdicom's
    unrestricted storage negotiation accepts all the same: it takes a UID for "unknown"
    when pynetdicom has no name equal to pydicom's keyword for it (`negotiate_unrestricted`)."""
    known = {name: uid for name, uid in vars(sop_class).items()
             if isinstance(uid, str) and uid.startswith("1.2.840.10008.") and name[:1].isupper()}
    storage = set(_STORAGE_CLASSES.values())
    return sorted(((name, uid) for name, uid in known.items()
                   if uid not in storage and not hasattr(sop_class, UID(uid).keyword)),
                  key=lambda nu: [int(p) for p in nu[1].split(".")])


def block_scp_other_classes() -> str:
    return table(("SOP Class Name", "SOP Class UID"),
                 ((UID(uid).name, code(uid)) for _, uid in other_classes_accepted()))


def block_scp_settings() -> str:
    d = receive_defaults()
    rows = [(code(f"receive.{key}"), what, SHOWN_INSTEAD.get(key) or shown(value_of(d, key), unit))
            for key, what, unit in RECEIVE_SETTINGS]
    return table(("Setting", "What it sets", "Default"), rows)


def block_scp_rejections() -> str:
    rows = [(f"{r} ({RESULT_TEXT[r]})", f"{s} ({SOURCE_TEXT[s]})",
             f"{n} ({status.classify_rejection(r, s, n)[1]})", when, by)
            for r, s, n, when, by in SCP_REJECTIONS]
    return table(("Result", "Source", "Reason/Diag.", "When", "Decided by"), rows)


def block_scp_verification_syntaxes() -> str:
    return table(("Transfer Syntax", "UID"),
                 ((UID(ts).name, code(ts)) for ts in DEFAULT_TRANSFER_SYNTAXES))


def kept_as(ts: UID) -> str:
    if ts in NATIVE_LITTLE_ENDIAN:
        return "compressed to the `pack.codec` syntax when the image allows; else as received"
    return "as received"


def block_scp_transfer_syntaxes() -> str:
    rows = [(UID(ts).name, code(ts), kept_as(UID(ts))) for ts in AllTransferSyntaxes]
    rows.append(("Any other, including private ones", "(any)", "as received"))
    return table(("Transfer Syntax", "UID", "Kept in the bundle"), rows)


def block_codecs() -> str:
    rows = [(code(name), UID(ts).name, code(ts)) for name, (ts, _, _) in CODECS.items()]
    rows.append((code("none"), "(no compression: every instance as received)", ""))
    return table(("pack.codec", "Transfer Syntax", "UID"), rows)


def block_scp_statuses() -> str:
    rows = [(hex4(st), meaning, code(outcome)) for outcome, (st, meaning) in STATUS.items()]
    return table(("Status", "Meaning", "Outcome (appliance status counts it under)"), rows)


def block_scu_sop_classes() -> str:
    return table(("SOP Class Name", "SOP Class UID", "Role"), (
        ("Every storage SOP class the Receive AE accepted (table 4.2.1-1), private ones included",
         "(as received)", "SCU"),
        (STORAGE_COMMITMENT_PUSH.name, code(STORAGE_COMMITMENT_PUSH),
         "SCU (only with storage_commitment = true)"),
    ))


def block_scu_contexts() -> str:
    own, pair = contexts.contexts_for("the instance's SOP class", "the instance's syntax in the bundle")
    rows = [
        ("1", own[0], ", ".join(own[1]), "the instance as it is in the bundle, byte for byte"),
        ("2", pair[0], ", ".join(f"{UID(ts).name} ({code(ts)})" for ts in pair[1]),
         "fallback: decompressed when the PACS refuses the instance's own syntax"),
        ("3", f"{STORAGE_COMMITMENT_PUSH.name} ({code(STORAGE_COMMITMENT_PUSH)})",
         ", ".join(f"{UID(ts).name} ({code(ts)})" for ts in UNCOMPRESSED),
         "only with storage_commitment = true"),
    ]
    return table(("Context", "Abstract Syntax", "Transfer Syntaxes", "Used for"), rows)


def block_scu_settings() -> str:
    d = dicom_destination_defaults()
    scu = AE()
    rows = [
        (code("destinations[].ae_title"), "the PACS's (called) AE title", "required"),
        (code("destinations[].calling_ae_title"), "the Forward AE's (calling) AE title",
         f"receive.ae_title ({code(receive_defaults().ae_title)})"),
        (code("destinations[].host"), "the PACS's address or host name", "required"),
        (code("destinations[].port"), "the PACS's port", shown(d.port, "")),
        (code("destinations[].timeout_s"),
         "connection, association, each DIMSE response without progress", shown(d.timeout_s, "s")),
        (code("destinations[].storage_commitment"), "ask for Storage Commitment (Push Model)",
         shown(d.storage_commitment, "")),
        (code("destinations[].commitment_timeout_s"), "time allowed for the complete report",
         shown(d.commitment_timeout_s, "s")),
        (code("destinations[].commitment_port"),
         "port of the commitment listener (reports on a new association)", shown(d.commitment_port, "")),
        (code("destinations[].commitment_bind"), "address the commitment listener binds to",
         shown(d.commitment_bind, "")),
        ("(fixed)", "maximum PDU length the Forward AE receives", shown(scu.maximum_pdu_size, "bytes")),
        ("(fixed)", "presentation contexts per association (more: several associations)",
         shown(contexts.MAX_CONTEXTS, "")),
    ]
    return table(("Setting", "What it sets", "Default"), rows)


def _status_rows() -> list[tuple[str, str, str]]:
    # the forward status table itself: single codes, then ranges (single codes win)
    keyed = [(st, hex4(st), meaning, outcome) for st, (outcome, meaning) in status._STATUS.items()]
    keyed += [(lo, f"{hex4(lo)}-{hex4(hi)}, others", meaning, outcome)
              for lo, hi, outcome, meaning in status._RANGES]
    rows = [(shown_code, meaning, OUTCOME_TEXT[outcome])
            for _, shown_code, meaning, outcome in sorted(keyed, key=lambda k: (k[0], k[1]))]
    verdict = status.classify_status(None)
    rows.append(("no response, timeout, abort", verdict.meaning, OUTCOME_TEXT[verdict.outcome]))
    unknown = status.classify_status(0xFFFF)
    rows.append(("any other status", unknown.meaning, OUTCOME_TEXT[unknown.outcome]))
    return rows


def block_scu_statuses() -> str:
    return table(("Status from the PACS", "Meaning", "What the appliance does"), _status_rows())


def _rejection_outcome(result: int, source: int, reason: int) -> str:
    """A rejected association concerns the whole bundle, not one of its instances."""
    permanent, _ = status.classify_rejection(result, source, reason)
    return "bundle held, with the reason" if permanent else OUTCOME_TEXT[status.Outcome.RETRY]


def block_scu_rejections() -> str:
    rows = [(f"{source} ({SOURCE_TEXT[source]})", f"{reason} ({text})",
             _rejection_outcome(1, source, reason), _rejection_outcome(2, source, reason))
            for (source, reason), text in status._REJECT_REASONS.items()]
    rows.append(("any", "any other", _rejection_outcome(1, 1, 99), _rejection_outcome(2, 1, 99)))
    return table(("Source", "Reason", "Result 1 (rejected-permanent)", "Result 2 (rejected-transient)"),
                 rows)


def block_commitment_failures() -> str:
    return table(("Failure Reason (0008,1197)", "Meaning"),
                 ((hex4(code_), meaning) for code_, meaning in sorted(status.COMMITMENT_FAILURES.items())))


BLOCKS: dict[str, Callable[[], str]] = {
    "version": block_version,
    "implementation": block_implementation,
    "scp-sop-classes": block_scp_sop_classes,
    "scp-other-classes": block_scp_other_classes,
    "scp-settings": block_scp_settings,
    "scp-rejections": block_scp_rejections,
    "scp-verification-syntaxes": block_scp_verification_syntaxes,
    "scp-transfer-syntaxes": block_scp_transfer_syntaxes,
    "codecs": block_codecs,
    "scp-statuses": block_scp_statuses,
    "scu-sop-classes": block_scu_sop_classes,
    "scu-contexts": block_scu_contexts,
    "scu-settings": block_scu_settings,
    "scu-statuses": block_scu_statuses,
    "scu-rejections": block_scu_rejections,
    "commitment-failures": block_commitment_failures,
}


def generate(text: str) -> tuple[str, list[str]]:
    """(the document with every block rewritten, names of blocks that changed). Raises
    ValueError for a block the document lacks or one this script does not know."""
    found = [m.group(2) for m in BLOCK_RE.finditer(text)]
    unknown = sorted(set(found) - set(BLOCKS))
    missing = sorted(set(BLOCKS) - set(found))
    if unknown or missing:
        raise ValueError(f"blocks unknown here: {unknown}; blocks missing in the document: {missing}")
    changed: list[str] = []

    def replace(m: re.Match[str]) -> str:
        body = BLOCKS[m.group(2)]()
        if body != m.group(3):
            changed.append(m.group(2))
        return m.group(1) + body + m.group(4)

    return BLOCK_RE.sub(replace, text), changed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only check; exit 1 if stale")
    args = ap.parse_args(argv)
    text = DOC.read_text()
    new, changed = generate(text)
    if args.check:
        if changed:
            print(f"{DOC.name}: stale blocks: {', '.join(changed)}; run python docs/gen_conformance.py",
                  file=sys.stderr)
            return 1
        return 0
    if changed:
        DOC.write_text(new)
    print(f"{DOC.name}: {len(changed)} blocks rewritten" + (f" ({', '.join(changed)})" if changed else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
