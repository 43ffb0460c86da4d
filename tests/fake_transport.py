"""A hand-written fake destination and transport, for scheduler tests without servers.

It is a real implementation of the transport contract (appliance/forward/__init__.py):
it opens and verifies the bundle with the appliance key like the real transports, honours
the plan (skip, only, suspects last, cancellation), and blames instances the way the dicom
transport does. tests/test_transport_contract.py runs the same conformance checks against
it as against the directory and dicom transports.

What the fake destination does with an instance is scripted by SOP Instance UID:
    "refuse"  a failure status (Permanent, blamed on the instance)
    "choke"   no answer: waits until the attempt is cancelled or `choke_s` passes, then
              Retryable blamed on the instance (a PACS that stops answering on it)
and the destination as a whole (failures of its own: no instance blamed, `scope`
"destination"):
    down = True     every attempt fails to connect (Retryable), and probes fail
    reject = True   every association is rejected (Permanent), and probes fail
    flaky = True    every attempt fails to connect (Retryable), but probes answer
    drop_after = n  it dies after storing n more instances: the one being sent is blamed
                    (a PACS that stops mid-association), and from then on it is `down`
    slow_s          each instance takes this long (an attempt that stays in flight)
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from appliance.bundle.format import PrivateKey, VerifiedBundle
from appliance.core.errors import IntegrityError
from appliance.forward import Answer, Permanent, Plan, Retryable, Unreadable


class FakeDestination:
    def __init__(self) -> None:
        self.script: dict[str, str] = {}
        self.down = False
        self.reject = False
        self.flaky = False
        self.retry_after_s: float | None = None  # what a flaky one asks for (HTTP Retry-After)
        self.drop_after: int | None = None
        self.slow_s = 0.0
        self.echo_fails = False  # a PACS that chokes on everything, C-ECHO included
        self.choke_s = 30.0
        self.stored: Counter[str] = Counter()  # SOP Instance UID -> times stored
        self.lock = threading.Lock()
        self.sending: set[str] = set()  # item ids being sent right now
        self.unchoke = threading.Event()  # ends every choke at once (test teardown)


class FakeTransport:
    def __init__(self, name: str, destination: FakeDestination, private_key: PrivateKey) -> None:
        self.name = name
        self.destination = destination
        self.private_key = private_key

    def send(self, item_id: str, bundle: Path, progress: Callable[[int], None],
             plan: Plan | None = None) -> None:
        plan = plan or Plan()
        d = self.destination
        if d.down or d.flaky:
            raise Retryable("the fake destination refused the connection",
                            retry_after_s=d.retry_after_s if d.flaky else None)
        if d.reject:
            raise Permanent("the fake destination rejected the association permanently")
        try:
            f = bundle.open("rb")
        except FileNotFoundError:
            raise Permanent("bundle file vanished from the queue", bundle=True) from None
        with d.lock:
            d.sending.add(item_id)
        try:
            with f:
                try:
                    verified = VerifiedBundle(f, self.private_key)
                    wanted = [e for e in verified.manifest.instances if plan.wants(e.index)]
                    order = ([e.index for e in wanted if e.index not in plan.last]
                             + [e.index for e in wanted if e.index in plan.last])
                    data = {e.index: (e, s.read()) for e, s in verified.streams() if plan.wants(e.index)}
                except IntegrityError as e:
                    raise Unreadable(f"bundle does not verify: {e}") from None
            done = 0
            for idx in order:
                if plan.cancelled.is_set():
                    raise Retryable("the attempt ran out of its time budget", instances=(idx,))
                entry, raw = data[idx]
                what = d.script.get(entry.sop_instance_uid, "store")
                if what == "refuse":
                    raise Permanent(f"the fake PACS refused instance {idx}", instances=(idx,))
                if what == "choke":
                    until = time.monotonic() + d.choke_s
                    while time.monotonic() < until and not (plan.cancelled.is_set() or d.unchoke.is_set()):
                        time.sleep(0.02)
                    raise Retryable(f"no answer while sending instance {idx}", instances=(idx,))
                if d.drop_after is not None:
                    if d.drop_after <= 0:
                        d.down, d.drop_after = True, None
                        raise Retryable(f"connection lost while sending instance {idx}", instances=(idx,))
                    d.drop_after -= 1
                until = time.monotonic() + d.slow_s
                while time.monotonic() < until and not plan.cancelled.is_set():
                    time.sleep(0.01)
                with d.lock:
                    d.stored[entry.sop_instance_uid] += 1
                done += len(raw)
                progress(done)
                plan.delivered(idx)
        finally:
            with d.lock:
                d.sending.discard(item_id)

    def probe(self) -> bool:
        return self.check().ok

    def check(self) -> Answer:
        d = self.destination
        if d.down:
            return Answer(False, "the fake destination refused the connection")
        if d.reject:
            return Answer(False, "the fake destination rejected the association")
        if d.echo_fails:
            return Answer(False, "the fake destination did not answer the echo")
        return Answer(True, "the fake destination answered")

    def close(self) -> None:
        pass
