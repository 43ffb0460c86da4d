"""What the codec says about an instance: the reasons it gives, its `Result`, its errors.

Owns nothing on disk or on the wire. `REASONS` is the closed set of machine-friendly
reasons `pack.codec.compress` gives (the packer and the bundle manifest carry them);
`_Pass` is how the codec's inner steps stop and pass an instance through with one of
them (`pack.stream` and `forward.convert` raise it too); `CodecError` is how
`decompress` fails. Nothing here logs. See `pack.codec` for the codec itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# Every reason `compress` can give, and what it means. "ok" is the only one for
# action="compressed". Reasons starting with "verify-" mean the codec is broken: log them
# as errors. "bits-allocated-N" exists for every N other than 8 and 16.
REASONS: dict[str, str] = {
    "ok": "compressed, and verified when verify=True",
    "codec-none": "codec 'none' configured",
    "unparseable": "not a Part-10 file pydicom can parse (header, meta or dataset)",
    "duplicate-element": "a top-level element occurs twice: which one is meant?",
    "no-file-meta": "no 128-byte preamble + 'DICM' + file meta",
    "no-transfer-syntax": "file meta has no (0002,0010)",
    "unknown-transfer-syntax": "(0002,0010) is not a transfer syntax we know",
    "transfer-syntax-mismatch": "dataset encoding differs from the one (0002,0010) declares",
    "big-endian": "Explicit VR Big Endian (retired) is not converted",
    "already-compressed": "encapsulated transfer syntax",
    "no-pixel-data": "no (7FE0,0010) Pixel Data: not an image",
    "float-pixels": "Float / Double Float Pixel Data",
    "bits-allocated-1": "1-bit (bit-packed) pixel data",
    "bits-allocated-32": "32-bit pixel data",
    "bad-pixel-attributes": "Rows/Columns/Bits/Samples/Frames missing or invalid",
    "bad-pixel-data": "Pixel Data element not a plain native value",
    "pixel-data-length-mismatch": "Pixel Data length differs from what the attributes say",
    "pixels-outside-bits-stored": "stored values use bits above Bits Stored: lossy to encode",
    "encode-error": "the encoder rejected the image",
    "too-large": "would need an Extended Offset Table (> 4 GiB)",
    "reencode-error": "implicit -> explicit VR rewrite failed",
    "reencode-mismatch": "implicit -> explicit VR rewrite changed an element",
    "not-smaller": "compressed file not smaller than the input",
    "verify-mismatch": "decoded pixels differ from the original",
    "verify-error": "our own output could not be decoded",
    "worker-crashed": "the worker process died on this instance, twice (CodecPool only)",
    "worker-timeout": "compressing it ran past pack.job_timeout_s (+ per MB): worker killed",
    "pack-error": "reading or identifying it in the worker failed: sent as is, as received",
    "stream-unsupported": "large instance the streaming path cannot take apart (deflated,"
                          " header or trailer too long, elements out of order): sent as is",
    "temp-write-error": "large instance: its compressed temp file could not be written",
    "inflated-too-large": "deflated data set larger than the cap once inflated (a deflate"
                          " bomb, or more than the in-memory path holds): sent as is",
}

Action = Literal["compressed", "passthrough"]


@dataclass(frozen=True)
class Result:
    """The outcome of `compress`. `data` is a complete Part-10 file (for a passthrough:
    the input object itself)."""

    data: bytes = field(repr=False)
    transfer_syntax: str  # of `data`; "" when the input has none we could read
    action: Action
    reason: str  # a key of REASONS
    input_size: int
    output_size: int
    frames: int = 0  # frames encoded (and verified) when compressed
    notes: tuple[str, ...] = ()  # attribute changes the syntax dictated, see module doc

    @property
    def ratio(self) -> float:
        return self.input_size / self.output_size if self.output_size else 1.0


class CodecError(ValueError):
    """`decompress` could not produce an uncompressed version of its input."""


class _Pass(Exception):
    """Internal: stop and pass the input through with `reason`."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
