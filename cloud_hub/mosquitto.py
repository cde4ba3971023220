"""Run a local Mosquitto broker as a child process: for the tests, the demo and the benchmarks.

Production runs Mosquitto as a system service with ``devices/mosquitto/mosquitto.conf``; this
module only starts a private one on a loopback port with its own config and persistence folder,
so nothing here touches a broker a machine may already run on 1883.

    with MosquittoProcess(workdir) as broker:       # a free loopback port, persistence on
        connect to ("127.0.0.1", broker.port)
        broker.kill()                               # SIGKILL, as a crash would
        broker.start()                              # same port, same persistence file

A missing ``mosquitto`` binary is a :class:`BrokerError` saying how to install it (the tests
fail on it; they never skip).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

from cloud_hub.worker import MAX_PACKET_SIZE

__all__ = ["BrokerError", "MosquittoProcess", "adapt_conf", "find_mosquitto", "free_port",
           "wait_listening"]

INSTALL_HINT = ("install it: 'sudo apt-get install mosquitto' (Debian, Ubuntu, Raspberry Pi OS) "
                "or run scripts/setup, which does it where it can")


class BrokerError(RuntimeError):
    """The broker could not be found, started or stopped."""


def _user_name() -> str:
    import pwd

    return pwd.getpwuid(os.geteuid()).pw_name


def find_mosquitto() -> str:
    """The path of the mosquitto binary, or BrokerError with the install hint."""
    found = shutil.which("mosquitto")
    for candidate in (found, "/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise BrokerError(f"mosquitto is not installed: {INSTALL_HINT}")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_listening(host: str, port: int, timeout: float = 10.0) -> bool:
    """True once something accepts TCP connections on (host, port), False after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.02)
    return False


class MosquittoProcess:
    """A private Mosquitto on ``127.0.0.1:<port>`` with persistence in ``workdir``.

    ``extra_conf`` lines are appended to the generated config (ACL files, password files,
    ``max_queued_messages``...). ``allow_anonymous`` defaults to True because a private
    loopback broker for a test or the demo has no users; the production config refuses them.
    ``max_packet_size`` (bytes; None: no limit) is the broker's bound on any packet a client
    sends, as in the production config: by default the hub's own limit
    (:data:`cloud_hub.worker.MAX_PACKET_SIZE`), so a client sending more is disconnected.

    ``conf`` replaces the generated config with a whole one (``extra_conf`` still appended), for
    running a real config file such as devices/mosquitto/mosquitto.conf; it must listen on
    ``host:port`` and keep its persistence in ``workdir``. :func:`adapt_conf` rewrites a
    production config that way.
    """

    def __init__(self, workdir: str | Path, *, port: int | None = None,
                 persistence: bool = True, allow_anonymous: bool = True,
                 extra_conf: str = "", host: str = "127.0.0.1",
                 conf: str | None = None,
                 max_packet_size: int | None = MAX_PACKET_SIZE) -> None:
        self.binary = find_mosquitto()
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.persistence = persistence
        self.allow_anonymous = allow_anonymous
        self.extra_conf = extra_conf
        self.max_packet_size = max_packet_size
        self.conf = conf
        self.conf_path = self.workdir / "mosquitto.conf"
        self.log_path = self.workdir / "mosquitto.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def _write_conf(self) -> None:
        if self.conf is not None:
            self.conf_path.write_text(self.conf.rstrip("\n") + "\n" + self.extra_conf + "\n",
                                      encoding="utf-8")
            return
        lines = [
            f"listener {self.port} {self.host}",
            f"allow_anonymous {'true' if self.allow_anonymous else 'false'}",
            f"persistence {'true' if self.persistence else 'false'}",
            f"persistence_location {self.workdir}/",
            "persistence_file mosquitto.db",
            # a test may queue a long offline backlog for a persistent session
            "max_queued_messages 100000",
            "max_inflight_messages 100",
            # whole packets, as devices/mosquitto/mosquitto.conf bounds them (no
            # message_size_limit here: tests send the hub oversized payloads on purpose)
            *([f"max_packet_size {self.max_packet_size}"] if self.max_packet_size else []),
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "connection_messages true",
            # as root, Mosquitto switches to the `mosquitto` user and then cannot write its
            # persistence into this (private, often 0700) folder: stay who started it
            *([f"user {_user_name()}"] if os.geteuid() == 0 and not any(
                line.split()[:1] == ["user"] for line in self.extra_conf.splitlines()) else []),
            self.extra_conf,
        ]
        self.conf_path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 10.0) -> MosquittoProcess:
        """Start (or restart on the same port); BrokerError if it does not listen in time."""
        if self.running:
            return self
        self._write_conf()
        log = self.log_path.open("ab")
        try:
            self.proc = subprocess.Popen([self.binary, "-c", str(self.conf_path)],
                                         stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BrokerError(f"mosquitto exited with code {self.proc.returncode} at start; "
                                  f"its log: {self.log_tail()}")
            if wait_listening(self.host, self.port, timeout=0.2):
                return self
        self.kill()
        raise BrokerError(f"mosquitto did not listen on {self.host}:{self.port} within "
                          f"{timeout} s; its log: {self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL: what a crash or a power cut does (no persistence save)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM and wait: a clean stop saves the persistence file."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc = None

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return " | ".join(text.strip().splitlines()[-lines:])

    def __enter__(self) -> MosquittoProcess:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def adapt_conf(conf: str, *, workdir: str | Path, port: int, host: str = "127.0.0.1",
               options: dict[str, str | Path] | None = None) -> str:
    """A production config made runnable in ``workdir`` on ``host:port``, otherwise unchanged.

    Its active ``listener`` lines become one plain listener on ``host:port`` (the commented TLS
    block stays commented), ``persistence_location`` becomes ``workdir``, and each option in
    ``options`` (``password_file``, ``acl_file``, ``user``...) takes the value given there,
    in place of the config's line or appended when the config has none.
    """
    values = {k: str(v) for k, v in (options or {}).items()}
    values["persistence_location"] = f"{Path(workdir)}/"
    out: list[str] = [f"listener {port} {host}"]
    seen: set[str] = set()
    for line in conf.splitlines():
        words = line.split()
        option = words[0] if words and not words[0].startswith("#") else None
        if option == "listener":
            continue
        if option in values:
            out.append(f"{option} {values[option]}")
            seen.add(option)
        else:
            out.append(line)
    out += [f"{k} {v}" for k, v in values.items() if k not in seen]
    return "\n".join(out) + "\n"
