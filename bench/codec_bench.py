"""Per-instance timings of appliance.pack.codec on real slices.

    .venv/bin/python bench/codec_bench.py [DIR_OR_FILES...]

Default input: the 28-slice Philips CT phantom series (512x512, 16-bit) from the shared
sample set. Prints, per codec, the median time of the bare encoder call (pydicom
Dataset.compress), of decoding the result, and of codec.compress() with and without
verification (which includes parsing, splicing and the size check), plus the ratio.
"""

from __future__ import annotations

import io
import statistics
import sys
import time
import warnings
from pathlib import Path

import pydicom

from appliance.pack import codec

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "dicom-samples"
DEFAULT = SAMPLES / "series" / "CT_Philips_Ingenuity_phantom_28sl"


def _ms(samples: list[float]) -> str:
    return f"{statistics.median(samples) * 1e3:6.1f} ms"


def main(argv: list[str]) -> int:
    paths = [Path(a) for a in argv] or [DEFAULT]
    files = sorted(f for p in paths for f in ([p] if p.is_file() else p.iterdir()) if f.is_file())
    blobs = [f.read_bytes() for f in files]
    warnings.simplefilter("ignore")
    print(f"{len(blobs)} files, {sum(map(len, blobs)) / 1e6:.1f} MB")
    for name, (uid, plugin, opts) in codec.CODECS.items():
        enc, dec, full, noverify, sizes = [], [], [], [], [0, 0]
        for raw in blobs:
            ds = pydicom.dcmread(io.BytesIO(raw))
            t = time.perf_counter()
            ds.compress(uid, encoding_plugin=plugin, generate_instance_uid=False, **opts)
            enc.append(time.perf_counter() - t)
            t = time.perf_counter()
            ds.pixel_array  # noqa: B018 - decode all frames
            dec.append(time.perf_counter() - t)
            t = time.perf_counter()
            r = codec.compress(raw, name, verify=True)
            full.append(time.perf_counter() - t)
            t = time.perf_counter()
            codec.compress(raw, name, verify=False)
            noverify.append(time.perf_counter() - t)
            sizes[0] += r.input_size
            sizes[1] += r.output_size
        print(f"{name:9s} encode {_ms(enc)}  decode {_ms(dec)}  compress(verify) {_ms(full)}"
              f"  compress(no verify) {_ms(noverify)}  ratio {sizes[0] / sizes[1]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
