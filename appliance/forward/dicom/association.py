"""Requesting an association with the PACS, and what its failure means to the operator.

`Requester` is the part of `DicomTransport` (transport.py) that opens one association:
it proposes the presentation contexts (with the TLS context when there is one), returns
a `Link` once the PACS accepted, and otherwise says why not, from what the socket saw
(`tls.Probe`: TLS alert, refused or silent connect) or from the PACS's answer (rejected,
permanently or for now; none of the contexts accepted: `NoContextAccepted`). Owns no
state of its own: the attributes it reads are set by `DicomTransport.__init__`.

How it fails: `Retryable` or `Permanent` (appliance.forward) with a reason naming host,
port and AE titles, never a UID; an association that did not come up is killed and its
socket closed before the error is raised.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Sequence
from typing import Any

from pynetdicom import build_context, evt

from appliance.core.config import Destination
from appliance.forward import Permanent, Retryable
from appliance.forward.dicom.contexts import STORAGE_COMMITMENT_PUSH, ContextSpec, uid_name
from appliance.forward.dicom.link import Link, bounded, close_socket
from appliance.forward.dicom.status import classify_rejection
from appliance.forward.dicom.tls import (
    ClientContext,
    Probe,
    ProbedAE,
    ProbedSocket,
    classify_tls_error,
    err_text,
)


class NoContextAccepted(Permanent):
    """The PACS answered the association request but took none of its contexts: it is
    there, and will not take these SOP classes (the instances' fault, not its own)."""


class Requester:
    """Opening an association for `DicomTransport` (which sets the attributes below)."""

    dest: Destination
    calling_ae: str
    timeout: float
    link_timeout: float
    _ae: ProbedAE
    _check_hostname: bool
    _same_association_report: Callable[[Any], tuple[int, None]]  # committing.Committer

    def _associate(self, specs: Sequence[ContextSpec], tls_ctx: ClientContext | None,
                   cancelled: threading.Event | None = None) -> Link:
        host, port = self.dest.host, self.dest.port
        assert host is not None and port is not None and self.dest.ae_title is not None
        contexts = [build_context(abstract, list(ts)) for abstract, ts in specs]
        tls_args: Any = None
        if tls_ctx is not None:
            # pynetdicom passes the name on as wrap_socket(server_hostname=...): None is fine.
            tls_args = (tls_ctx, host if self._check_hostname else None)
        try:
            assoc = self._ae.associate(
                host, port, contexts=contexts, ae_title=self.dest.ae_title, tls_args=tls_args,
                evt_handlers=[(evt.EVT_N_EVENT_REPORT, self._same_association_report)])
        except socket.gaierror:
            raise Retryable(f"cannot resolve the PACS host name {host!r}") from None
        except OSError as e:
            raise Retryable(f"cannot connect to the PACS at {host}:{port}: {err_text(e)}") from None
        sock = assoc.dul.socket
        probe = sock.probe if isinstance(sock, ProbedSocket) else Probe()
        if assoc.is_established:
            link = Link(assoc, probe, self.timeout, cancelled, self.link_timeout)
            if (why := link.lost_reason()) is not None:  # TLS 1.3: alert after "success"
                link.kill()
                raise self._failure_from_probe(probe) or Retryable(why)
            return link
        with contextlib.suppress(Exception):
            if assoc.is_alive() or assoc.dul.is_alive():
                bounded(assoc.kill, 5)
        close_socket(assoc)
        raise self._failure_from_probe(probe) or self._negotiation_failure(assoc, specs)

    def _failure_from_probe(self, probe: Probe) -> Retryable | Permanent | None:
        host, port = self.dest.host, self.dest.port
        if probe.tls_error is not None:
            permanent, text = classify_tls_error(probe.tls_error)
            return Permanent(text) if permanent else Retryable(text)
        e = probe.connect_error
        if e is None:
            return None
        if isinstance(e, TimeoutError | socket.timeout) and probe.connect_timed_out:
            return Retryable(f"cannot connect to the PACS at {host}:{port}: no answer within"
                             f" {self.link_timeout:g} s (link_timeout_s)")
        if isinstance(e, TimeoutError | socket.timeout):
            return Retryable(f"connecting to the PACS at {host}:{port} timed out after {self.timeout:g} s")
        if isinstance(e, ConnectionRefusedError):
            return Retryable(f"the PACS at {host}:{port} refused the connection "
                             "(not running, or not listening on this port?)")
        return Retryable(f"cannot connect to the PACS at {host}:{port}: {err_text(e)}")

    def _negotiation_failure(self, assoc: Any, specs: Sequence[ContextSpec]) -> Exception:
        prim = assoc.acceptor.primitive
        if assoc.is_rejected and prim is not None:
            permanent, text = classify_rejection(prim.result, prim.result_source, prim.diagnostic)
            hint = ""
            if "calling AE" in text:
                hint = f" (this appliance calls as {self.calling_ae!r}: is it declared on the PACS?)"
            elif "called AE" in text:
                hint = f" (ae_title is {self.dest.ae_title!r}: is that the PACS's AE title?)"
            if permanent:
                return Permanent(f"the PACS rejected the association permanently: {text}{hint}")
            return Retryable(f"the PACS rejected the association for now: {text}{hint}")
        if assoc.is_aborted and prim is not None and prim.result == 0x00:
            classes = sorted({uid_name(a) for a, _ in specs if a != STORAGE_COMMITMENT_PUSH})
            return NoContextAccepted("the PACS accepted none of the proposed presentation contexts: "
                                     f"it does not accept SOP class {', '.join(classes)}")
        if assoc.is_aborted:
            return Retryable("the PACS aborted the association request")
        return Retryable(f"no answer from the PACS to the association request within {self.timeout:g} s")
