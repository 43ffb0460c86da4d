"""appliance/core/pynetdicom_compat.py: the version check, and guards that fail when one of
the pynetdicom internals we patch or read changes shape (so that an upgrade is checked
there instead of being discovered on a scanner)."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pynetdicom
import pytest
from pynetdicom import AE, dimse_messages
from pynetdicom.association import Association
from pynetdicom.dimse_messages import DIMSEMessage
from pynetdicom.dul import DULServiceProvider
from pynetdicom.transport import AssociationServer, AssociationSocket, RequestHandler

from appliance.core import pynetdicom_compat as compat
from tests.peers import REPO, Appliance, base_config, free_port


@pytest.mark.parametrize(("version", "ok"), [
    ("3.0.1", True), ("3.0.4", True), ("3.0.10", True), ("3.0.0", False), ("3.1.0", False),
    ("3.1.0.dev0", False), ("2.1.2", False), ("4.0.0", False), ("nonsense", False)])
def test_version_problem_names_the_tested_range(version: str, ok: bool) -> None:
    problem = compat.version_problem(version)
    assert (problem is None) is ok
    if not ok:
        assert problem is not None
        assert f"pynetdicom {version} is installed" in problem
        assert ">= 3.0.1, < 3.1.0" in problem


def test_installed_pynetdicom_is_in_the_tested_range() -> None:
    compat.check_version()  # raises DependencyError otherwise
    assert compat.version_problem(pynetdicom.__version__) is None


def test_daemon_refuses_to_start_on_an_untested_pynetdicom(tmp_path: Path) -> None:
    """`appliance run` with pynetdicom claiming 3.1.0: one clear line, exit 70, before
    anything is bound or created in the state directory."""
    app = Appliance(tmp_path / "a", base_config(tmp_path / "a", free_port()))
    code = ("import sys, pynetdicom; pynetdicom.__version__ = '3.1.0'; "
            "from appliance.cli import main; sys.exit(main(sys.argv[1:]))")
    r = subprocess.run([sys.executable, "-c", code, "run", "--config", str(app.config_path)],
                       capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 70, r.stderr
    assert r.stderr.startswith("error: pynetdicom 3.1.0 is installed, but this appliance is "
                               "tested only with pynetdicom >= 3.0.1, < 3.1.0"), r.stderr
    assert "Traceback" not in r.stderr
    assert not (app.state_dir / "run" / "daemon.lock").exists()


# --- guards: the internals we rely on --------------------------------------------------


def test_reactors_sleep_through_their_module_time() -> None:
    """replace_reactor_sleep swaps `time` in pynetdicom.association and pynetdicom.dul:
    both reactors must still sleep through that module name."""
    import pynetdicom.association as association_module
    import pynetdicom.dul as dul_module

    assert hasattr(association_module, "time") and hasattr(dul_module, "time")
    assert "time.sleep(" in inspect.getsource(Association._run_reactor)
    assert "time.sleep(self._run_loop_delay)" in inspect.getsource(DULServiceProvider.run_reactor)


def test_chunked_store_names_are_still_used() -> None:
    """route_chunked_store swaps three names pynetdicom's chunked receive uses; a pynetdicom
    that renamed them would silently fall back to a plaintext temp file."""
    src = inspect.getsource(DIMSEMessage.decode_msg)
    for name in ("NamedTemporaryFile", "create_file_meta", "write_file_meta_info"):
        assert hasattr(dimse_messages, name), name
        assert f"{name}(" in src, name
    assert "STORE_RECV_CHUNKED_DATASET" in src and "_data_set_file.write(" in src


def test_socket_factories_are_still_private_methods_we_can_override() -> None:
    """ClientAE and ClientSocket override `_create_socket`; pynetdicom must still call them."""
    assert list(inspect.signature(AE._create_socket).parameters) == ["self", "assoc", "address", "tls_args"]
    assert "self._create_socket(" in inspect.getsource(AE.associate)
    assert list(inspect.signature(AssociationSocket._create_socket).parameters) == ["self", "address"]
    assert "self._create_socket(" in inspect.getsource(AssociationSocket.__init__)
    assert "self._is_connected" in inspect.getsource(AssociationSocket.ready.fget)  # type: ignore[attr-defined]


def test_reactor_pause_attributes_are_still_there() -> None:
    """pause_reactor / release_while_paused use the reactor's checkpoint event and flag."""
    src = inspect.getsource(Association._run_reactor)
    assert "self._reactor_checkpoint.wait()" in src and "self._is_paused = True" in src
    assoc = Association(AE(), "requestor")
    assert assoc._reactor_checkpoint.is_set() and assoc._is_paused is False


def test_dul_reads_a_pdu_as_header_then_body() -> None:
    """GatedSocket checks a PDU's header before its body is read: it relies on the DUL
    reading only when `ready`, then exactly 6 bytes, then exactly the declared length."""
    read = inspect.getsource(DULServiceProvider._read_pdu_data)
    assert "self.socket.recv(6)" in read and "self.socket.recv(pdu_length)" in read
    assert "self.socket.ready" in inspect.getsource(DULServiceProvider._is_transport_event)


def test_acceptor_socket_is_made_where_gated_handler_expects() -> None:
    """GatedHandler lets pynetdicom build the acceptor's AssociationSocket from the request
    in `_create_association`, then gives that object the GatedSocket class."""
    src = inspect.getsource(RequestHandler._create_association)
    assert "AssociationSocket(assoc, client_socket=self.request)" in src
    assert "assoc.set_socket(sock)" in src
    assert "__slots__" not in vars(AssociationSocket)  # a class swap keeps the object's state
    assert "self.dul.socket" in inspect.getsource(Association.run_reactor)


def test_server_shutdown_still_needs_our_workaround() -> None:
    """close_server bypasses AssociationServer.shutdown, which removes the server from
    ae._servers (where only start_server puts it)."""
    assert "self.ae._servers.remove" in inspect.getsource(AssociationServer.shutdown)
