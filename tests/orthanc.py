"""Test helper: run a real Orthanc (Debian package `orthanc`) on loopback for tests and benches.

    with Orthanc(tmp_path / "orthanc") as pacs:
        storescu(pacs.dicom_port, files, called="ORTHANC")
        assert pacs.count() == len(files)
        data = pacs.instance_file(pacs.find_instance(sop_uid))

Everything lives in the given directory: the JSON config, the storage area and the SQLite
index, and Orthanc's log (`orthanc.log`). The DICOM and HTTP ports are free loopback
ports. With `netns=NAME` it runs inside that network namespace (tests/wan.py): the DICOM
port listens on every address there, and the REST API is reached from the namespace's own
loopback (the calling thread enters it for each request). The REST API is only reachable
from loopback (`RemoteAccessAllowed: false`) and
needs no credentials. No plugin is loaded unless `plugins=` names one (the Debian
package's own config loads its plugins folder; ours does not use that config at all).

Options checked against Orthanc 1.10.1 (`Orthanc --config=FILE` prints the defaults):
`MaximumPduLength` (4096..131072, since 1.9.0), `SyncStorageArea` (fsync of each stored
file, default true since 1.7.4), `DicomTls*` (since 1.9.0; `DicomTlsRemoteCertificateRequired`
since 1.9.3). With `DicomTlsEnabled`, Orthanc's DICOM port speaks TLS only.

The process is started with `TCP_NODELAY=1` in its environment: the DCMTK inside Orthanc
otherwise stalls ~45 ms per image (Nagle + delayed ACK). It is stopped by its PID:
SIGTERM, then SIGKILL after a grace period.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.peers import free_port
from tests.wan import entered, exec_prefix

ORTHANC_BIN = os.environ.get("ORTHANC_BIN") or shutil.which("Orthanc") or "/usr/sbin/Orthanc"


@dataclass(frozen=True)
class OrthancTLS:
    """DICOM TLS for Orthanc's SCP (and SCU): PEM files; `trusted` is a bundle of certs."""

    certificate: Path
    private_key: Path
    trusted: Path
    remote_certificate_required: bool = True


@dataclass(frozen=True)
class Modality:
    """An entry of `DicomModalities` (a peer Orthanc may talk to, e.g. as C-STORE SCU)."""

    aet: str
    host: str
    port: int
    use_tls: bool = False
    extra: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"AET": self.aet, "Host": self.host, "Port": self.port}
        if self.use_tls:
            d["UseDicomTls"] = True
        d.update(self.extra or {})
        return d


class OrthancError(RuntimeError):
    pass


class Orthanc:
    """One Orthanc process with its own config, storage, index and log in `root`."""

    def __init__(self, root: Path, *, aet: str = "ORTHANC", modalities: dict[str, Modality] | None = None,
                 plugins: list[str | Path] | None = None, tls: OrthancTLS | None = None,
                 max_pdu: int = 16384, sync_storage: bool = True,
                 extra: dict[str, Any] | None = None, netns: str | None = None) -> None:
        self.root = Path(root)
        self.netns = netns  # run inside this network namespace (tests/wan.py)
        self.root.mkdir(parents=True, exist_ok=True)
        self.aet = aet
        self.dicom_port = free_port()
        self.http_port = free_port()
        while self.http_port == self.dicom_port:
            self.http_port = free_port()
        self.storage = self.root / "storage"
        self.index_dir = self.root / "index"
        self.config: dict[str, Any] = {
            "Name": "orthanc-test",
            "StorageDirectory": str(self.storage),
            "IndexDirectory": str(self.index_dir),
            "StorageCompression": False,
            "SyncStorageArea": sync_storage,
            "Plugins": [str(p) for p in plugins or []],
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "HttpCompressionEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomModalities": {k: m.to_json() for k, m in (modalities or {}).items()},
            "DicomModalitiesInDatabase": False,
            "OrthancPeersInDatabase": False,
            "MaximumPduLength": max_pdu,
            "SaveJobs": False,
            "DicomTlsEnabled": tls is not None,
        }
        if tls is not None:
            self.config.update({
                "DicomTlsCertificate": str(tls.certificate),
                "DicomTlsPrivateKey": str(tls.private_key),
                "DicomTlsTrustedCertificates": str(tls.trusted),
                "DicomTlsRemoteCertificateRequired": tls.remote_certificate_required,
            })
        self.config.update(extra or {})
        self.config_path = self.root / "orthanc.json"
        self.log_path = self.root / "orthanc.log"
        self.proc: subprocess.Popen[bytes] | None = None

    # --- lifecycle ---

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self, timeout: float = 30) -> Orthanc:
        self.config_path.write_text(json.dumps(self.config, indent=2))
        log = self.log_path.open("ab")
        try:
            self.proc = subprocess.Popen(
                [*exec_prefix(self.netns), ORTHANC_BIN, str(self.config_path)], stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, cwd=self.root, env={**os.environ, "TCP_NODELAY": "1"},
                start_new_session=True)
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise OrthancError(f"Orthanc exited with {self.proc.returncode}:\n{self.log_text()}")
                with contextlib.suppress(OSError, OrthancError):
                    self.get("/system", timeout=2)
                    return self
                time.sleep(0.05)
            raise TimeoutError(f"Orthanc REST API not answering on {self.url}:\n{self.log_text()}")
        except BaseException:
            self.stop()
            raise

    def stop(self, grace: float = 10) -> int | None:
        """SIGTERM by PID, SIGKILL after `grace` seconds; returns the exit code if it exited."""
        p = self.proc
        if p is None:
            return None
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGTERM)
            try:
                p.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGKILL)
                p.wait(10)
        return p.returncode

    def __enter__(self) -> Orthanc:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # --- REST ---

    def request(self, method: str, path: str, body: bytes | None = None,
                content_type: str = "application/json", timeout: float = 60) -> bytes:
        req = urllib.request.Request(self.url + path, data=body, method=method)  # noqa: S310
        if body is not None:
            req.add_header("Content-Type", content_type)
        try:
            with self._in_netns(), urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310
                data: bytes = r.read()
                return data
        except urllib.error.HTTPError as e:
            raise OrthancError(f"{method} {path}: HTTP {e.code}: {e.read()[:500]!r}") from None

    def _in_netns(self) -> contextlib.AbstractContextManager[None]:
        """Connections to the REST API are made from inside Orthanc's namespace, if any."""
        return entered(self.netns) if self.netns else contextlib.nullcontext()

    def get(self, path: str, timeout: float = 60) -> Any:
        return json.loads(self.request("GET", path, timeout=timeout))

    def post(self, path: str, payload: Any) -> Any:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        return json.loads(self.request("POST", path, body) or b"null")

    def system(self) -> dict[str, Any]:
        result: dict[str, Any] = self.get("/system")
        return result

    def instances(self) -> list[str]:
        """Orthanc ids of every stored instance."""
        result: list[str] = self.get("/instances")
        return result

    def count(self) -> int:
        """How many instances are stored."""
        return int(self.get("/statistics")["CountInstances"])

    def instance_tags(self, orthanc_id: str, simplify: bool = True) -> dict[str, Any]:
        """Tags of an instance: {"SOPInstanceUID": ...} (simplified) or {"0008,0018": {...}}."""
        which = "simplified-tags" if simplify else "tags"
        result: dict[str, Any] = self.get(f"/instances/{orthanc_id}/{which}")
        return result

    def instance_file(self, orthanc_id: str) -> bytes:
        """The Part-10 file exactly as Orthanc stored it."""
        return self.request("GET", f"/instances/{orthanc_id}/file")

    def find_instance(self, sop_instance_uid: str) -> str | None:
        """The Orthanc id of the instance with this SOP Instance UID, or None."""
        hits = json.loads(self.request("POST", "/tools/lookup", sop_instance_uid.encode(), "text/plain"))
        for h in hits:
            if h.get("Type") == "Instance":
                return str(h["ID"])
        return None

    def files_by_sop_uid(self) -> dict[str, bytes]:
        """Every stored instance as {SOP Instance UID: Part-10 bytes} (small sets only)."""
        out = {}
        for oid in self.instances():
            out[str(self.instance_tags(oid)["SOPInstanceUID"])] = self.instance_file(oid)
        return out

    def wait_count(self, n: int, timeout: float = 30) -> int:
        """Wait until at least `n` instances are stored; returns the last count seen."""
        deadline = time.monotonic() + timeout
        c = self.count()
        while c < n and time.monotonic() < deadline:
            time.sleep(0.05)
            c = self.count()
        return c

    def delete_all(self) -> None:
        for pid in self.get("/patients"):
            self.request("DELETE", f"/patients/{urllib.parse.quote(pid)}")
