"""OpenWrt's own userland in the tests: a router's root file system laid over this machine's.

`tools/owrt-userland.sh` builds OpenWrt's daemons and libraries from the source tarballs into a
cached skeleton of an OpenWrt root (`.cache/owrt/<key>`: /usr/sbin/ubusd, rpcd, procd, uhttpd,
/usr/bin/ubus, uci, jsonfilter, /etc/rc.common, /lib/functions.sh, luci-base in /www and
/usr/share/ucode/luci ...). `OwrtRoot` runs them where a router keeps them:

- a private mount namespace whose / is an overlay of the host's / with that skeleton (and any
  packages the test installs) on top, so every absolute path compiled into the daemons
  (/etc/config, /usr/share/rpcd/acl.d, /var/run/ubus/ubus.sock, /www ...) is the router's;
- /tmp and /var are one host folder (OpenWrt links /var to /tmp), /etc/config another, so the
  test reads logs, sockets and config files from the host side;
- /bin/sh is busybox ash (procd.sh needs it), /dev is private with a /dev/log for syslogd,
  /usr/bin/python3 runs this venv's interpreter with OpenWrt's site-packages folder first;
- optionally inside a network namespace (the router of a tests.support.netns.Topology).

Every process runs through `nsenter` into that namespace and root. Leaving the context ends the
holder process, which takes the namespace and its mounts with it; the processes started in it
are killed first.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "tools" / "owrt-userland.sh"
PY_SITE = "/usr/lib/python3.11/site-packages"  # OpenWrt 24.10's python3 (tools/ipk.py ships there)
UBUS_SOCK = "/var/run/ubus/ubus.sock"


@cache
def userland() -> Path | None:
    """The built OpenWrt userland (tools/owrt-userland.sh), or None when it is not built."""
    p = subprocess.run(["bash", str(BUILD_SCRIPT), "--prefix"], capture_output=True, text=True)
    if p.returncode != 0:
        return None
    prefix = Path(p.stdout.strip())
    return prefix if (prefix / ".done").is_file() else None


def why_no_userland() -> str:
    return ("OpenWrt userland not built: tools/owrt-userland.sh needs the source tarballs in "
            "../shared/openwrt-userland/sources (or OWRT_SOURCES); `make deps` builds them")


# The holder: sets the namespace up, chroots into it, prints READY and waits for stdin to close.
_HOLDER = r"""
import os, subprocess, sys
work, netns = sys.argv[1], sys.argv[2]
def sh(*argv):
    subprocess.run(argv, check=True)
merged = f"{work}/merged"
sh("mount", "--make-rprivate", "/")
sh("mount", "-t", "overlay", "overlay", "-o",
   f"lowerdir=/,upperdir={work}/upper,workdir={work}/overlay-work", merged)
for d in ("proc", "sys"):
    sh("mount", "--rbind", f"/{d}", f"{merged}/{d}")
# a private /dev: the host's device nodes, and room for our own /dev/log
sh("mount", "-t", "tmpfs", "-o", "mode=755", "owrt-dev", f"{merged}/dev")
for node in ("null", "zero", "full", "random", "urandom", "tty"):
    open(f"{merged}/dev/{node}", "w").close()
    sh("mount", "--bind", f"/dev/{node}", f"{merged}/dev/{node}")
os.makedirs(f"{merged}/dev/pts")
sh("mount", "--bind", "/dev/pts", f"{merged}/dev/pts")
os.makedirs(f"{merged}/dev/shm")
sh("mount", "-t", "tmpfs", "owrt-shm", f"{merged}/dev/shm")
os.symlink("pts/ptmx", f"{merged}/dev/ptmx")
# OpenWrt: /var is /tmp (one tmpfs); here one host folder for both, so the test sees inside
sh("mount", "--bind", f"{work}/tmp", f"{merged}/tmp")
sh("mount", "--bind", f"{work}/tmp", f"{merged}/var")
sh("mount", "--bind", f"{work}/etc-config", f"{merged}/etc/config")
# this checkout (the venv, the userland's libraries) where the binds above would hide it
repo = sys.argv[3]
if repo.startswith(("/tmp/", "/var/")):
    os.makedirs(merged + repo, exist_ok=True)
    sh("mount", "--bind", repo, merged + repo)
os.chroot(merged)
os.chdir("/")
print("READY", flush=True)
sys.stdin.read()
"""

# /usr/bin/python3 inside the root: this venv's interpreter, OpenWrt's site-packages first (so the
# files a package installed there win over the repository's editable install).
_PYTHON_WRAPPER = f"""#!/bin/sh
PYTHONPATH={PY_SITE}${{PYTHONPATH:+:$PYTHONPATH}} exec {sys.executable} "$@"
"""


class OwrtRoot:
    """An OpenWrt root in a private mount namespace (see the module docstring).

    `netns` runs it inside that network namespace (its daemons then serve that namespace, as the
    router's do). Files for the root can be staged into `upper` before `start()` (they then lie
    on top of the host's); after it, `write()` puts them in through the namespace.
    """

    def __init__(self, workdir: Path, netns: str | None = None, prefix: Path | None = None):
        prefix = prefix or userland()
        if prefix is None:
            raise RuntimeError(why_no_userland())
        self.prefix = prefix
        self.workdir = workdir
        self.netns = netns
        self.upper = workdir / "upper"
        self.tmp = workdir / "tmp"  # /tmp and /var inside
        self.etc_config = workdir / "etc-config"  # /etc/config inside
        self._holder: subprocess.Popen | None = None
        self._procs: list[subprocess.Popen] = []
        for d in (self.upper, workdir / "overlay-work", workdir / "merged", self.tmp, self.etc_config):
            d.mkdir(parents=True, exist_ok=True)
        for d in ("run", "lock", "state", "log", "run/ubus"):
            (self.tmp / d).mkdir(parents=True, exist_ok=True)
        self._stage_skeleton()

    # --- files -----------------------------------------------------------------------------------

    def host_path(self, path: str) -> Path:
        """Where the file at `path` inside the root is staged on the host, before start(): the
        overlay's upper layer, following the host's merged-/usr links (/lib -> usr/lib)."""
        parts = Path(path).relative_to("/").parts
        top = Path("/") / parts[0]
        if top.is_symlink():  # /bin, /sbin, /lib are links into /usr on Debian: stage there
            parts = (*Path(os.readlink(top)).parts, *parts[1:])
        if parts[0] == "etc" and len(parts) > 1 and parts[1] == "config":
            return self.etc_config.joinpath(*parts[2:])
        if parts[0] in ("tmp", "var"):
            return self.tmp.joinpath(*parts[1:])
        return self.upper.joinpath(*parts)

    def stage(self, path: str, data: bytes | str, mode: int = 0o644) -> None:
        """Put a file into the root before start()."""
        target = self.host_path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_symlink() or target.exists():
            target.unlink()
        target.write_bytes(data.encode() if isinstance(data, str) else data)
        target.chmod(mode)

    def _stage_tree(self, src: Path, dest: str) -> None:
        for dirpath, _, files in os.walk(src):
            for name in files:
                f = Path(dirpath) / name
                rel = f.relative_to(src).as_posix()
                target = self.host_path(f"{dest.rstrip('/')}/{rel}")
                target.parent.mkdir(parents=True, exist_ok=True)
                if f.is_symlink():
                    if target.is_symlink() or target.exists():
                        target.unlink()
                    target.symlink_to(os.readlink(f))
                else:
                    shutil.copy2(f, target)

    def _stage_skeleton(self) -> None:
        for top in sorted(self.prefix.iterdir()):
            if top.is_dir():
                self._stage_tree(top, "/" + top.name)
        shutil.rmtree(self.upper / "usr" / "include", ignore_errors=True)
        # /bin/sh is busybox ash, as on OpenWrt (procd.sh uses `let`, fds above 9 and `&>`)
        sh = self.host_path("/bin/sh")
        sh.parent.mkdir(parents=True, exist_ok=True)
        sh.symlink_to("/usr/bin/busybox")
        self.stage("/usr/bin/python3", _PYTHON_WRAPPER, 0o755)
        # OpenWrt's /etc/rc.d (enabled init scripts) and hotplug folder
        (self.upper / "etc" / "rc.d").mkdir(parents=True, exist_ok=True)
        (self.upper / "etc" / "config").mkdir(parents=True, exist_ok=True)  # mount point of etc_config
        (self.upper / "etc" / "hotplug.d").mkdir(parents=True, exist_ok=True)

    def install_package(self, files: Sequence) -> None:
        """Stage a package's files (tools/ipk.py Entry objects: path, data, mode) into the root,
        as opkg would unpack them."""
        for e in files:
            self.stage(e.path, e.data, e.mode)

    def write(self, path: str, data: bytes | str, mode: int = 0o644) -> None:
        """Write a file inside the running root."""
        data = data.encode() if isinstance(data, str) else data
        self.run(["sh", "-c", 'mkdir -p "$(dirname "$1")" && cat > "$1" && chmod "$2" "$1"', "sh", path,
                  format(mode, "o")], input=data, check=True)

    # --- processes -------------------------------------------------------------------------------

    def _enter(self) -> list[str]:
        assert self._holder is not None, "OwrtRoot not started"
        argv = ["nsenter", "-t", str(self._holder.pid), "-m", "-r", "-w"]
        if self.netns:
            argv.append("-n")
        return argv

    def argv(self, argv: Sequence[str]) -> list[str]:
        """`argv` as a command line run inside the root."""
        return [*self._enter(), "--", *argv]

    def run(self, argv: Sequence[str], **kw) -> subprocess.CompletedProcess:
        kw.setdefault("capture_output", True)
        kw.setdefault("timeout", 60)
        env = kw.pop("env", None)
        return subprocess.run(self.argv(["env", "-i", *self._env(env), *argv]), **kw)

    def popen(self, argv: Sequence[str], log: str | None = None, env: dict[str, str] | None = None,
              **kw) -> subprocess.Popen:
        """Start a process inside the root; `log` (a path inside, e.g. /tmp/log/ubusd.log) takes
        its output. It is killed when the root stops."""
        if log is not None:
            host_log = self.host_path(log)
            host_log.parent.mkdir(parents=True, exist_ok=True)
            kw["stdout"] = host_log.open("ab")
            kw["stderr"] = subprocess.STDOUT
        kw.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(self.argv(["env", "-i", *self._env(env), *argv]), **kw)
        self._procs.append(proc)
        return proc

    @staticmethod
    def _env(extra: dict[str, str] | None) -> list[str]:
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C.UTF-8"}
        env.update(extra or {})
        return [f"{k}={v}" for k, v in env.items()]

    def start(self) -> OwrtRoot:
        argv = ["unshare", "-m", "--propagation", "private", sys.executable, "-c", _HOLDER, str(self.workdir),
                self.netns or "", str(REPO)]
        if self.netns:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        self._holder = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        line = self._holder.stdout.readline()
        if line.strip() != b"READY":
            err = self._holder.stderr.read().decode(errors="replace")
            self._holder.kill()
            raise RuntimeError(f"OpenWrt root did not start: {err[-2000:]}")
        return self

    def stop(self) -> None:
        for proc in reversed(self._procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        for proc in reversed(self._procs):
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._procs.clear()
        if self._holder is not None:
            self._kill_leftovers()
            self._holder.stdin.close()
            try:
                self._holder.wait(10)
            except subprocess.TimeoutExpired:
                self._holder.kill()
                self._holder.wait()
            self._holder = None

    def _kill_leftovers(self) -> None:
        """SIGKILL whatever still runs in the namespace (daemons' children, procd's instances)."""
        assert self._holder is not None
        try:
            ns = os.readlink(f"/proc/{self._holder.pid}/ns/mnt")
        except OSError:
            return
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == self._holder.pid:
                continue
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{entry}/ns/mnt") == ns:
                    os.kill(int(entry), signal.SIGKILL)

    def pids(self) -> list[int]:
        """Processes running inside the root (the holder excluded)."""
        assert self._holder is not None
        ns = os.readlink(f"/proc/{self._holder.pid}/ns/mnt")
        out = []
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) != self._holder.pid:
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{entry}/ns/mnt") == ns:
                        out.append(int(entry))
        return out

    def __enter__(self) -> OwrtRoot:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- daemons ---------------------------------------------------------------------------------

    @property
    def ubus_socket(self) -> Path:
        """The host path of /var/run/ubus/ubus.sock (reachable from any network namespace)."""
        return self.host_path(UBUS_SOCK)

    def start_ubusd(self, timeout: float = 10.0) -> subprocess.Popen:
        proc = self.popen(["/usr/sbin/ubusd", "-s", UBUS_SOCK], log="/tmp/log/ubusd.log")
        wait_for(lambda: self.ubus_socket.is_socket(), timeout, "ubusd socket")
        return proc

    def ubus(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
        """The `ubus` command line inside the root: ubus("call", "bitmesh", "status")."""
        return self.run(["ubus", *args], text=True, timeout=timeout)


    def start_syslogd(self) -> subprocess.Popen:
        """busybox syslogd on /dev/log, writing /tmp/log/messages: the router's `logread`."""
        proc = self.popen(["busybox", "syslogd", "-n", "-O", "/tmp/log/messages"], log="/tmp/log/syslogd.log")
        wait_for(lambda: self.run(["test", "-S", "/dev/log"]).returncode == 0, 10, "syslogd's /dev/log")
        return proc

    def logread(self) -> str:
        path = self.host_path("/tmp/log/messages")
        return path.read_text(errors="replace") if path.exists() else ""

    def start_procd(self) -> subprocess.Popen:
        """procd as the service manager (not PID 1: it serves the `service` object on ubus and
        runs init scripts' instances, with syslogd taking their output), after ubusd."""
        if not self.ubus_socket.is_socket():
            self.start_ubusd()
        self.start_syslogd()
        proc = self.popen(["/usr/sbin/procd", "-s", UBUS_SOCK], log="/tmp/log/procd.log")
        wait_for(lambda: "service" in self.ubus("list").stdout.split(), 10, "procd's service object")
        return proc

    def start_rpcd(self, logins: Sequence[Login] = ()) -> subprocess.Popen:
        """rpcd with OpenWrt's defaults and these logins in /etc/config/rpcd (passwords hashed
        with `openssl passwd -6`, as on a router); ACLs from /usr/share/rpcd/acl.d."""
        text = "config rpcd\n\toption socket /var/run/ubus/ubus.sock\n\toption timeout 30\n"
        for login in logins:
            digest = subprocess.run(["openssl", "passwd", "-6", "-stdin"], input=login.password, text=True,
                                    capture_output=True, check=True).stdout.strip()
            text += f"\nconfig login\n\toption username '{login.username}'\n\toption password '{digest}'\n"
            text += "".join(f"\tlist read '{g}'\n" for g in login.read)
            text += "".join(f"\tlist write '{g}'\n" for g in login.write)
        path = self.host_path("/etc/config/rpcd")
        path.write_text(text)
        path.chmod(0o600)
        proc = self.popen(["/usr/sbin/rpcd", "-s", UBUS_SOCK], log="/tmp/log/rpcd.log")
        wait_for(lambda: "session" in self.ubus("list").stdout.split(), 10, "rpcd's session object")
        return proc

    def start_uhttpd(self, port: int, host: str = "127.0.0.1", luci: bool = False) -> subprocess.Popen:
        """uhttpd serving /www with the /ubus JSON-RPC endpoint, as LuCI uses it; `luci` also
        routes /cgi-bin/luci to LuCI's ucode dispatcher as /etc/config/uhttpd does on a router."""
        argv = ["/usr/sbin/uhttpd", "-f", "-p", f"{host}:{port}", "-h", "/www", "-u", "/ubus", "-U", UBUS_SOCK]
        if luci:
            argv += ["-o", "/cgi-bin/luci", "-O", "/usr/share/ucode/luci/uhttpd.uc"]
        proc = self.popen(argv, log="/tmp/log/uhttpd.log")
        wait_for(lambda: _port_open(self, host, port), 10, f"uhttpd on {host}:{port}")
        return proc


@dataclass(frozen=True)
class Login:
    """A `config login` of /etc/config/rpcd: who may log in to LuCI and with which ACL groups."""

    username: str
    password: str
    read: tuple[str, ...] = ("*",)
    write: tuple[str, ...] = ("*",)


def _port_open(root: OwrtRoot, host: str, port: int) -> bool:
    code = f"import socket; socket.create_connection(({host!r}, {port}), 0.5).close()"
    return root.run([sys.executable, "-c", code], timeout=10).returncode == 0


class UbusHttp:
    """A LuCI-style client of uhttpd's /ubus JSON-RPC endpoint: login, then calls with the session."""

    ANONYMOUS = "0" * 32

    def __init__(self, url: str):
        self.url = url.rstrip("/") + "/ubus"
        self.session = self.ANONYMOUS

    def rpc(self, method: str, params: list) -> dict:
        import json
        import urllib.request

        body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}).encode()
        req = urllib.request.Request(self.url, body, {"Content-Type": "application/json"})
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(req, timeout=30) as resp:
            return json.loads(resp.read())

    def call(self, obj: str, method: str, **args) -> tuple[int, dict | None]:
        """(ubus status, reply) as LuCI's rpc.js sees them; a JSON-RPC error (access denied, no
        such object) raises UbusHttpError."""
        answer = self.rpc("call", [self.session, obj, method, args])
        if "error" in answer:
            raise UbusHttpError(answer["error"].get("code"), answer["error"].get("message"))
        result = answer["result"]
        return result[0], (result[1] if len(result) > 1 else None)

    def login(self, username: str, password: str) -> UbusHttp:
        status, reply = self.call("session", "login", username=username, password=password)
        if status != 0 or not reply:
            raise UbusHttpError(status, f"login as {username} refused")
        self.session = reply["ubus_rpc_session"]
        return self


class UbusHttpError(Exception):
    def __init__(self, code, message):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def wait_for(predicate, timeout: float, what: str, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(interval)


@contextlib.contextmanager
def owrt_root(workdir: Path, netns: str | None = None) -> Iterator[OwrtRoot]:
    root = OwrtRoot(workdir, netns)
    with root:
        yield root
