"""The embedded MongoDB-wire server: SecantusDB, run as a child process.

SecantusDB (PyPI ``SecantusDB``, MongoDB wire protocol over WiredTiger) is
GPL-2.0. The gateway only starts its ``secantusd-py`` program and talks to it
over a socket, and imports none of its code.
"""

from __future__ import annotations

import ctypes
import logging
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["EmbeddedMongo", "EmbeddedMongoError", "free_port"]

logger = logging.getLogger("chat.embedded")
_PROGRAM = "secantusd-py"
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


class EmbeddedMongoError(RuntimeError):
    """The embedded server could not be started."""


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free on ``host`` right now."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def _exit_with_parent() -> None:
    """Ask Linux to SIGTERM this child when the thread that started it dies.

    Without it, a gateway killed with SIGKILL leaves SecantusDB running and
    holding its data folder, and the next start fails on the WiredTiger lock.
    """
    # Runs in the forked child, so it only calls into a library loaded before.
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _program() -> str:
    beside = Path(sys.executable).with_name(_PROGRAM)
    if beside.exists():
        return str(beside)
    found = shutil.which(_PROGRAM)
    if found is None:
        raise EmbeddedMongoError(
            f"{_PROGRAM} not found beside {sys.executable} or on PATH: install the "
            "SecantusDB package (pip install -e .) or set MONGODB_URI to a MongoDB server"
        )
    return found


class EmbeddedMongo:
    """A SecantusDB server on a free loopback port, with its data under a folder."""

    def __init__(
        self, data_dir: Path, *, port: int | None = None, test_commands: bool = False
    ) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.test_commands = test_commands
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir / "secantusdb.log"

    @property
    def uri(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}/?directConnection=true"

    @property
    def gateway_uri(self) -> str:
        """Return the URI the gateway itself uses, with retryable writes off.

        SecantusDB 0.7 keeps a record of every retryable write for 30 minutes and
        scans them all on each write: over 10,000 messages its CPU per message
        grew from 1.5 to 2.2 ms. The gateway does not need driver retries for
        safety, because a failed batch is reported as ``store_unavailable`` and
        the client's resend with the same ``client_msg_id`` is stored once.
        """
        return self.uri + "&retryWrites=false"

    def start(self, timeout: float = 30.0) -> None:
        """Start the server and wait until it accepts connections."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        command = [
            _program(),
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--storage-path", str(self.data_dir / "db"),
            "--log-level", "WARNING",
        ]  # fmt: skip
        if self.test_commands:
            command.append("--enable-test-commands")
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_exit_with_parent,
            )
        self._wait_ready(timeout)
        logger.info(
            "started embedded SecantusDB",
            extra={
                "pid": self.process.pid,
                "uri": self.uri,
                "data_dir": str(self.data_dir),
            },
        )

    def _wait_ready(self, timeout: float) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise EmbeddedMongoError(
                    f"SecantusDB exited with code {self.process.returncode} at start-up; "
                    f"its log {self.log_path} ends with:\n{self._log_tail()}\nIf another "
                    "process holds this folder (a running gateway, or a SecantusDB "
                    "left behind: `pgrep -af secantusd-py`), stop it or choose "
                    "another --data-dir"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise EmbeddedMongoError(
            f"SecantusDB did not listen on 127.0.0.1:{self.port} within {timeout:.0f} s; "
            f"see {self.log_path}"
        )

    def _log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(
                self.log_path.read_text(errors="replace").splitlines()[-lines:]
            )
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout``)."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            logger.warning(
                "SecantusDB ignored SIGTERM; killing it", extra={"pid": process.pid}
            )
            process.kill()
            process.wait()
        logger.info("stopped embedded SecantusDB", extra={"pid": process.pid})

    def kill(self) -> None:
        """Kill the server at once (SIGKILL), as a crash would."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None
