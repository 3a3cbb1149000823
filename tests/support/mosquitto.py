"""A real mosquitto broker for the tests and the bench: on a free 127.0.0.1 port, optionally with
TLS (a CA and a server certificate made here with the `openssl` command) and a password file
(`mosquitto_passwd`). It runs as root (`user root`: the tests' temporary folders are 0700, so the
mosquitto user could not read its files), no pid_file; `restart()` keeps the port, the
credentials and the certificates (a broker restarted mid-session), and loses everything it held
in memory (persistence off: retained messages too), as a broker that crashed would; with
`persistence` it keeps sessions (a persistent subscriber's queued messages) and retained ones.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.bcoin import free_port


def available() -> bool:
    return shutil.which("mosquitto") is not None and shutil.which("openssl") is not None


def make_ca(workdir: Path, host: str = "127.0.0.1") -> tuple[Path, Path, Path]:
    """(ca.pem, server.pem, server.key): a CA and a certificate for `host` (IP SAN) signed by it."""
    ca_key, ca, key, csr, cert = (workdir / n for n in ("ca.key", "ca.pem", "server.key", "server.csr", "server.pem"))
    ext = workdir / "san.ext"
    ext.write_text(f"subjectAltName=IP:{host}\n")

    def run(*argv: str) -> None:
        subprocess.run(["openssl", *argv], check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out", str(ca), "-days", "2",
        "-subj", "/CN=bitmesh test CA")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={host}")
    run("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial", "-out", str(cert),
        "-days", "2", "-extfile", str(ext))
    return ca, cert, key


@dataclass
class Mosquitto:
    workdir: Path
    tls: bool = False
    users: dict[str, str] = field(default_factory=dict)  # user -> password; empty: anonymous allowed
    persistence: bool = False  # keep sessions and retained messages across restart()
    port: int = 0
    ca: Path | None = None
    proc: subprocess.Popen | None = None

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        lines = [f"listener {self.port} 127.0.0.1", "user root", f"persistence {str(self.persistence).lower()}",
                 f"persistence_location {self.workdir}/",
                 f"allow_anonymous {'false' if self.users else 'true'}", "max_queued_messages 100000"]
        if self.users:
            passwd = self.workdir / "passwd"
            passwd.write_text("")
            passwd.chmod(0o600)
            for user, password in self.users.items():
                subprocess.run(["mosquitto_passwd", "-b", str(passwd), user, password], check=True,
                               capture_output=True, timeout=30)
            lines.append(f"password_file {passwd}")
        if self.tls:
            self.ca, cert, key = make_ca(self.workdir)
            lines += [f"cafile {self.ca}", f"certfile {cert}", f"keyfile {key}"]
        self.conf = self.workdir / "mosquitto.conf"
        self.conf.write_text("\n".join(lines) + "\n")
        self.log = self.workdir / "mosquitto.log"

    @property
    def broker(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> Mosquitto:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(["mosquitto", "-c", str(self.conf)], stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return self
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mosquitto did not start:\n{self.log.read_text()[-2000:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self) -> Mosquitto:
        self.stop()
        return self.start()


@contextlib.contextmanager
def mosquitto(workdir: Path, **kw) -> Iterator[Mosquitto]:
    broker = Mosquitto(workdir, **kw).start()
    try:
        yield broker
    finally:
        broker.stop()
