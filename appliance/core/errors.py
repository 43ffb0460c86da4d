"""The appliance's exception hierarchy.

Every error a user can meet is a subclass of `ApplianceError`. Its message is written
for the person at the console (a field technician or the operations center), it never
contains patient data, and it carries the exit code the CLI returns. One top-level
handler in `cli.main` turns any of them into one line on stderr and that code; nothing
else in the package calls `sys.exit`.

Exit codes follow sysexits(3) where one fits, so that scripts and systemd can tell a
bad config (78, which systemd should not restart into a loop) from a transient fault
(75: a port in use, an address not up yet; systemd starts the daemon again).
"""

from __future__ import annotations

EX_USAGE = 64
EX_DATAERR = 65
EX_NOINPUT = 66
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_CANTCREAT = 73
EX_IOERR = 74
EX_TEMPFAIL = 75
EX_NOPERM = 77
EX_CONFIG = 78


class ApplianceError(Exception):
    """Something went wrong."""

    exit_code = EX_SOFTWARE


class ConfigError(ApplianceError):
    """The configuration is not valid.

    `problems` holds one line per problem, each naming the file and the dotted key.
    """

    exit_code = EX_CONFIG

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class KeyFileError(ApplianceError):
    """A key file is missing, unreadable, of the wrong kind, or too open."""

    exit_code = EX_CONFIG


class IntegrityError(ApplianceError):
    """Stored or received data failed authentication: wrong key, tampering or corruption."""

    exit_code = EX_DATAERR


class SpoolFullError(ApplianceError):
    """The spool's filesystem is at its configured free-space reserve."""

    exit_code = EX_TEMPFAIL


class NotFoundError(ApplianceError):
    """The named item does not exist."""

    exit_code = EX_NOINPUT


class StateError(ApplianceError):
    """The state directory is missing, unwritable or in use by another daemon."""

    exit_code = EX_CANTCREAT


class DaemonNotRunningError(ApplianceError):
    """No daemon listens on the control socket (a hung one: health.control.DaemonUnavailable)."""

    exit_code = EX_UNAVAILABLE


class PermissionDeniedError(ApplianceError):
    """This user may not use what the command needs (the status socket is 0600)."""

    exit_code = EX_NOPERM


class DependencyError(ApplianceError):
    """An installed library is not a version this appliance was built and tested with."""

    exit_code = EX_SOFTWARE


class ListenError(ApplianceError):
    """A listening port cannot be opened.

    Temporary (EX_TEMPFAIL, so that systemd starts the daemon again a little later): the
    port is in use, or the address is not (yet) one of this machine's. EX_NOPERM: no
    permission to listen on a port below 1024.
    """

    exit_code = EX_TEMPFAIL

    def __init__(self, message: str, temporary: bool = True) -> None:
        super().__init__(message)
        self.exit_code = EX_TEMPFAIL if temporary else EX_NOPERM


class UsageError(ApplianceError):
    """The command line is not valid."""

    exit_code = EX_USAGE
