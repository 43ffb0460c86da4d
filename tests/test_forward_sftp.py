"""The sftp transport against a real OpenSSH sshd (tests/sshd.py): what arrives, host-key
pinning, resuming a cut upload, failures and how they are classed, and the daemon end to
end. The transport contract itself is checked in tests/test_transport_contract.py."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.bundle import format as bundle_format
from appliance.core import crypto
from appliance.forward import Permanent, Plan, Retryable, Unreadable
from appliance.forward.sftp import SftpTransport
from tests.peers import SAMPLES, base_config, free_port, storescu, wait_for
from tests.sshd import REMOTE_DIR, Relay, Sshd, fingerprint, keygen
from tests.test_transport_contract import KEY, make_bundle


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    """One sshd for the module (its drop is emptied before each test)."""
    with Sshd(tmp_path_factory.mktemp("sshd")) as s:
        yield s


@pytest.fixture
def drop(server: Sshd) -> Path:
    for p in server.drop.iterdir():
        p.unlink()
    return server.drop


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle of 20 CT slices (~10 MiB): big enough to cut an upload in the middle."""
    return make_bundle(tmp_path_factory.mktemp("big") / "big1.bundle", n=20)[0]


def send(t: SftpTransport, bundle: Path, plan: Plan | None = None) -> list[int]:
    got: list[int] = []
    plan = plan or Plan()
    t.send(bundle.stem, bundle, lambda n: None,
           Plan(skip=plan.skip, only=plan.only, cancelled=plan.cancelled, delivered=got.append))
    return got


def test_delivers_the_bundle_byte_identical_under_its_final_name(server: Sshd, drop: Path,
                                                                 tmp_path: Path) -> None:
    bundle, _ = make_bundle(tmp_path / "b1.bundle")
    assert send(SftpTransport(server.destination(), KEY), bundle) == [0, 1, 2]
    assert (drop / "b1.bundle").read_bytes() == bundle.read_bytes()
    assert sorted(p.name for p in drop.iterdir()) == ["b1.bundle"]  # no .part left


def test_progress_is_reported_per_chunk_up_to_the_bundle_size(server: Sshd, drop: Path,
                                                              big: Path) -> None:
    seen: list[int] = []
    SftpTransport(server.destination(), KEY).send("big1", big, seen.append)
    assert len(seen) > 10 and seen == sorted(seen) and seen[-1] == big.stat().st_size


def test_a_host_key_pinned_by_fingerprint_is_accepted(server: Sshd, drop: Path, tmp_path: Path) -> None:
    bundle, _ = make_bundle(tmp_path / "b1.bundle")
    dest = server.destination(host_key_sha256=fingerprint(server.host_pub))
    assert send(SftpTransport(dest, KEY), bundle) == [0, 1, 2]


def test_a_changed_host_key_is_refused_naming_the_key_seen(server: Sshd, drop: Path,
                                                           tmp_path: Path) -> None:
    other = keygen(tmp_path / "impostor")
    known = tmp_path / "known_hosts"
    known.write_text(server.known_hosts_line(other.with_suffix(".pub")))
    bundle, _ = make_bundle(tmp_path / "b1.bundle")
    with pytest.raises(Permanent) as e:
        send(SftpTransport(server.destination(known_hosts=known), KEY), bundle)
    assert fingerprint(server.host_pub) in str(e.value) and "not the one in" in str(e.value)
    assert not isinstance(e.value, Unreadable) and e.value.instances == ()
    assert list(drop.iterdir()) == []


def test_a_wrong_fingerprint_is_refused_naming_the_key_seen(server: Sshd, drop: Path,
                                                            tmp_path: Path) -> None:
    other = keygen(tmp_path / "impostor")
    bundle, _ = make_bundle(tmp_path / "b1.bundle")
    dest = server.destination(host_key_sha256=fingerprint(other.with_suffix(".pub")))
    with pytest.raises(Permanent, match="not the pinned host_key_sha256") as e:
        send(SftpTransport(dest, KEY), bundle)
    assert fingerprint(server.host_pub) in str(e.value)
    assert list(drop.iterdir()) == []


def test_an_unknown_host_is_refused_naming_the_key_seen(server: Sshd, drop: Path, tmp_path: Path) -> None:
    known = tmp_path / "known_hosts"
    known.write_text(server.known_hosts_line().replace("[127.0.0.1]", "[upload.example]"))
    bundle, _ = make_bundle(tmp_path / "b1.bundle")
    with pytest.raises(Permanent, match=r"no host key for \[127.0.0.1\]") as e:
        send(SftpTransport(server.destination(known_hosts=known), KEY), bundle)
    assert fingerprint(server.host_pub) in str(e.value)
    assert list(drop.iterdir()) == []


def test_a_known_hosts_file_with_markers_is_refused_with_the_reason(server: Sshd, drop: Path,
                                                                     tmp_path: Path) -> None:
    known = tmp_path / "known_hosts"
    known.write_text("@cert-authority *.example " + server.host_pub.read_text()
                     + server.known_hosts_line())
    bundle, _ = make_bundle(tmp_path / "b1.bundle")
    with pytest.raises(Permanent, match="markers such as @cert-authority"):
        send(SftpTransport(server.destination(known_hosts=known), KEY), bundle)
    assert list(drop.iterdir()) == []


def test_a_probe_refuses_a_changed_host_key(server: Sshd, tmp_path: Path) -> None:
    other = keygen(tmp_path / "impostor")
    known = tmp_path / "known_hosts"
    known.write_text(server.known_hosts_line(other.with_suffix(".pub")))
    assert SftpTransport(server.destination(known_hosts=known), KEY).probe() is False


def test_a_key_the_server_does_not_accept_is_permanent_with_the_fix(server: Sshd, drop: Path,
                                                                     tmp_path: Path) -> None:
    stranger = keygen(tmp_path / "stranger")
    bundle, _ = make_bundle(tmp_path / "b1.bundle")
    with pytest.raises(Permanent, match="authorized keys") as e:
        send(SftpTransport(server.destination(key=stranger), KEY), bundle)
    assert fingerprint(stranger.with_suffix(".pub")) in str(e.value) and e.value.instances == ()


@pytest.mark.parametrize("passphrase", [None, "wrong"])
def test_a_key_that_cannot_be_loaded_is_permanent_naming_key_passphrase(
        server: Sshd, tmp_path: Path, passphrase: str | None) -> None:
    locked = tmp_path / "locked"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "right", "-f", str(locked)],
                   check=True, capture_output=True, timeout=60)
    bundle, _ = make_bundle(tmp_path / "b1.bundle")
    with pytest.raises(Permanent, match="key_passphrase") as e:
        send(SftpTransport(server.destination(key=locked, key_passphrase=passphrase), KEY), bundle)
    assert "right" not in str(e.value)


def test_an_upload_cut_mid_file_resumes_from_the_servers_size(server: Sshd, drop: Path,
                                                              big: Path) -> None:
    size = big.stat().st_size
    with Relay(server.port, cut_after=size * 6 // 10) as relay:
        t = SftpTransport(server.destination(port=relay.port), KEY)
        with pytest.raises(Retryable) as e:
            send(t, big)
        assert relay.cuts == 1 and e.value.instances == ()
        part = drop / "big1.bundle.part"
        held = wait_for(lambda: part.exists() and part.stat().st_size, 20, "the server to keep the .part")
        before = relay.sent
        assert send(t, big) == list(range(20))
        resent = relay.sent - before
    assert (drop / "big1.bundle").read_bytes() == big.read_bytes()
    assert resent < size - held + 512 * 1024, (size, held, resent)


def test_a_part_whose_bytes_differ_from_ours_is_written_afresh(server: Sshd, drop: Path,
                                                               big: Path) -> None:
    data = big.read_bytes()
    damaged = bytearray(data[:3_000_000])
    damaged[-100] ^= 0xFF  # the tail a cut link would have left, but damaged
    (drop / "big1.bundle.part").write_bytes(damaged)
    send(SftpTransport(server.destination(), KEY), big)
    assert (drop / "big1.bundle").read_bytes() == data


def test_a_part_from_another_file_is_written_afresh(server: Sshd, drop: Path, big: Path) -> None:
    (drop / "big1.bundle.part").write_bytes(b"\0" * 1_000_000)
    send(SftpTransport(server.destination(), KEY), big)
    assert (drop / "big1.bundle").read_bytes() == big.read_bytes()


def test_a_part_longer_than_the_bundle_is_written_afresh(server: Sshd, drop: Path, big: Path) -> None:
    (drop / "big1.bundle.part").write_bytes(big.read_bytes() + b"trailing")
    send(SftpTransport(server.destination(), KEY), big)
    assert (drop / "big1.bundle").read_bytes() == big.read_bytes()


def test_a_bundle_already_under_its_final_name_is_not_sent_again(server: Sshd, drop: Path,
                                                                 big: Path) -> None:
    final = drop / "big1.bundle"
    final.write_bytes(big.read_bytes())
    before = final.stat()
    with Relay(server.port) as relay:
        assert send(SftpTransport(server.destination(port=relay.port), KEY), big) == list(range(20))
        assert relay.sent < 100_000
    after = final.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_a_stale_final_file_of_another_size_is_replaced(server: Sshd, drop: Path, tmp_path: Path) -> None:
    bundle, _ = make_bundle(tmp_path / "b1.bundle")
    (drop / "b1.bundle").write_bytes(b"an older, shorter file")
    send(SftpTransport(server.destination(), KEY), bundle)
    assert (drop / "b1.bundle").read_bytes() == bundle.read_bytes()


def test_a_bundle_that_fails_authentication_leaves_nothing_on_the_server(server: Sshd, drop: Path,
                                                                         tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "bad1.bundle", n=20)[0]
    data = bytearray(bundle.read_bytes())
    data[len(data) * 3 // 4] ^= 0x01  # most of it is uploaded before the damage is read
    bundle.write_bytes(bytes(data))
    with pytest.raises(Unreadable):
        send(SftpTransport(server.destination(), KEY), bundle)
    assert list(drop.iterdir()) == []


def test_a_missing_remote_folder_is_retryable(server: Sshd, drop: Path, tmp_path: Path) -> None:
    bundle, _ = make_bundle(tmp_path / "b1.bundle")
    with pytest.raises(Retryable, match="remote_dir") as e:
        send(SftpTransport(server.destination(remote_dir="/not-there"), KEY), bundle)
    assert not isinstance(e.value, Permanent)


def test_a_server_that_never_answers_is_retryable_within_its_timeout(tmp_path: Path, server: Sshd) -> None:
    silent = socket.create_server(("127.0.0.1", 0))  # accepts (the kernel does), never speaks
    bundle, _ = make_bundle(tmp_path / "b1.bundle")
    t0 = time.monotonic()
    with silent, pytest.raises(Retryable, match="did not answer within 2 s"):
        send(SftpTransport(server.destination(port=silent.getsockname()[1], timeout_s=2.0,
                                              host_key_sha256=fingerprint(server.host_pub)), KEY),
             bundle)
    assert time.monotonic() - t0 < 15


def test_a_connect_nobody_answers_gives_up_after_link_timeout_not_timeout(
        tmp_path: Path, server: Sshd) -> None:
    """A listener whose accept queue is full: the kernel drops further SYNs, as a silent
    link would. The connect ends after link_timeout_s (2), not timeout_s (30)."""
    bundle, _ = make_bundle(tmp_path / "b1.bundle")
    with socket.create_server(("127.0.0.1", 0), backlog=0) as full, socket.socket() as queued:
        queued.connect(full.getsockname())  # fills the queue: nothing accepts it
        dest = server.destination(port=full.getsockname()[1], timeout_s=30.0, link_timeout_s=2.0,
                                  host_key_sha256=fingerprint(server.host_pub))
        t0 = time.monotonic()
        with pytest.raises(Retryable, match=r"did not answer within 2 s while connecting \(link_timeout_s\)"):
            send(SftpTransport(dest, KEY), bundle)
    assert time.monotonic() - t0 < 10


def test_a_refused_connection_is_retryable(tmp_path: Path, server: Sshd) -> None:
    bundle, _ = make_bundle(tmp_path / "b1.bundle")
    with pytest.raises(Retryable, match="refused the connection"):
        send(SftpTransport(server.destination(port=free_port()), KEY), bundle)


def test_a_cancel_stops_an_upload_blocked_in_a_write_within_seconds(server: Sshd, drop: Path,
                                                                    big: Path) -> None:
    """timeout_s is 120: only the cancel can end this attempt in time."""
    plan = Plan()
    cancelled_at: list[float] = []
    with Relay(server.port, hold_after=3_000_000) as relay:
        def cancel_once_the_link_is_silent() -> None:
            wait_for(lambda: relay.sent >= 3_000_000, 60, "the link to go silent")
            time.sleep(1.0)  # let the writes fill the server's window and block
            cancelled_at.append(time.monotonic())
            plan.cancelled.set()
        canceller = threading.Thread(target=cancel_once_the_link_is_silent)
        canceller.start()
        t = SftpTransport(server.destination(port=relay.port, timeout_s=120.0), KEY)
        with pytest.raises(Retryable, match="time budget"):
            send(t, big, plan)
        stopped = time.monotonic()
        canceller.join(10)
    assert stopped - cancelled_at[0] < 5


def test_a_cancel_stops_a_hung_ssh_handshake_within_seconds(server: Sshd, tmp_path: Path) -> None:
    """A server that accepts and never speaks; timeout_s is 120: only the cancel ends it."""
    silent = socket.create_server(("127.0.0.1", 0))
    bundle, _ = make_bundle(tmp_path / "b1.bundle")
    plan = Plan()
    timer = threading.Timer(1.0, plan.cancelled.set)
    dest = server.destination(port=silent.getsockname()[1], timeout_s=120.0,
                              host_key_sha256=fingerprint(server.host_pub))
    t0 = time.monotonic()
    timer.start()
    with silent, pytest.raises(Retryable, match="time budget while doing the SSH handshake"):
        send(SftpTransport(dest, KEY), bundle, plan)
    assert time.monotonic() - t0 < 6


def test_a_full_remote_disk_is_retryable(tmp_path: Path, big: Path) -> None:
    with Sshd(tmp_path / "full", drop_mb=2) as small, \
            pytest.raises(Retryable, match="disk may be full") as e:
        send(SftpTransport(small.destination(), KEY), big)
    assert not isinstance(e.value, Permanent)


def test_a_channel_closed_mid_write_is_a_broken_connection_not_a_full_disk(
        server: Sshd) -> None:
    """paramiko says "Socket is closed" with no errno, like an SFTP status: a link cut
    mid-upload must not send the technician looking for a full disk (seen in CI)."""
    from appliance.forward.sftp import _Step
    t = SftpTransport(server.destination(), KEY)
    cut = t._failure(OSError("Socket is closed"), _Step("uploading"), threading.Event())
    assert "failed while uploading" in str(cut) and "disk" not in str(cut)
    full = t._failure(OSError("Failure"), _Step("uploading"), threading.Event())
    assert "disk may be full" in str(full)


def test_openssh_offers_fsync_and_posix_rename_and_they_are_used(server: Sshd) -> None:
    from appliance.forward.sftp import _Step
    t = SftpTransport(server.destination(), KEY)
    with t._session(_Step("test"), threading.Event()) as sftp:
        assert {"fsync@openssh.com", "posix-rename@openssh.com"} <= sftp.extensions
        assert "check-file" not in sftp.extensions  # why the upload is checked by size


def sftp_daemon(appliance_factory: Any, server: Sshd, root: Path, port: int | None = None,
                **queue: Any) -> tuple[Any, dict[str, Any]]:
    """The daemon with one sftp destination: `server`, or the relay on `port` before it."""
    cfg = base_config(root, free_port())
    dest = server.destination(port=port)
    cfg["destinations"] = [{"name": "center", "transport": "sftp", "host": dest.host,
                            "port": dest.port, "user": dest.user, "key": str(dest.key),
                            "known_hosts": str(dest.known_hosts), "remote_dir": REMOTE_DIR}]
    if queue:
        cfg["queue"] = queue
    return appliance_factory(cfg, root=root), cfg


def delivered_instances(drop: Path, cfg: dict[str, Any]) -> int:
    """Instances in the one bundle in the drop, verified with the appliance's key."""
    (bundle,) = drop.glob("*.bundle")
    key = crypto.load_private_key(Path(cfg["encryption"]["appliance_key"]))
    with bundle.open("rb") as f:
        return len(bundle_format.read_manifest(f, key).instances)


def test_the_daemon_delivers_a_study_sent_by_storescu(appliance_factory: Any, server: Sshd,
                                                      drop: Path, tmp_path: Path) -> None:
    files = sorted((SAMPLES / "series" / "CT_Philips_Ingenuity_phantom_28sl").iterdir())[:5]
    app, cfg = sftp_daemon(appliance_factory, server, tmp_path / "edge")
    r = storescu(app.port, files)
    assert r.returncode == 0, r.stderr
    wait_for(lambda: list(drop.glob("*.bundle")), 120, "a bundle in the drop", detail=app.log_text)
    assert delivered_instances(drop, cfg) == len(files)
    assert not list(drop.glob("*.part"))


def test_the_daemon_retries_an_upload_cut_mid_file_until_it_is_delivered(
        appliance_factory: Any, server: Sshd, drop: Path, tmp_path: Path) -> None:
    files = sorted((SAMPLES / "series" / "CT_Philips_Ingenuity_phantom_28sl").iterdir())[:12]
    with Relay(server.port, cut_after=400_000) as relay:
        app, cfg = sftp_daemon(appliance_factory, server, tmp_path / "edge", relay.port,
                               retry_min_s=0.5, retry_max_s=2)
        r = storescu(app.port, files)
        assert r.returncode == 0, r.stderr
        wait_for(lambda: list(drop.glob("*.bundle")), 120, "a bundle in the drop",
                 detail=app.log_text)
        assert relay.cuts == 1
    deferred = [line for line in app.log_text().splitlines() if '"bundle.deferred"' in line]
    assert len(deferred) == 1 and "failed while uploading" in deferred[0], app.log_text()
    assert delivered_instances(drop, cfg) == len(files)
    assert not list(drop.glob("*.part"))
