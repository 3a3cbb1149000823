"""A real bcoin regtest node for tests (see DESIGN.md, "Real components in tests").

The node runs in its own process group, so stop() ends it with whatever it spawned; every
started node is also stopped at interpreter exit and, when started from the main thread, dies
with the test process (PR_SET_PDEATHSIG via setpriv) even if pytest itself is SIGKILLed.
"""

from __future__ import annotations

import atexit
import base64
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
BCOIN_BIN = REPO_ROOT / "node_modules" / "bcoin" / "bin" / "node"

_live: set[BcoinNode] = set()


class BcoinRpcError(RuntimeError):
    """The node answered a JSON-RPC call with an error."""

    def __init__(self, method: str, code: int, message: str):
        super().__init__(f"{method}: {message} (code {code})")
        self.method, self.code, self.message = method, code, message


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pdeathsig_prefix() -> list[str]:
    """Command prefix making the node get SIGKILL when its parent dies (pytest killed hard).
    setpriv (util-linux) does the prctl, so no preexec_fn runs in a forked threaded process.
    The signal follows the *thread* that started the node, hence main-thread starts only."""
    if shutil.which("setpriv") and threading.current_thread() is threading.main_thread():
        return ["setpriv", "--pdeathsig", "KILL"]
    return []


class BcoinNode:
    """bcoin regtest in `workdir`; ports are chosen on the first start() and kept on restart()."""

    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)
        self.api_key = secrets.token_hex(16)
        self.rpc_port = 0
        self.wallet_port = 0
        self.proc: subprocess.Popen | None = None
        self._ids = 0

    # --- lifecycle -----------------------------------------------------------------------

    @property
    def rpc_url(self) -> str:
        return f"http://x:{self.api_key}@127.0.0.1:{self.rpc_port}/"

    @property
    def debug_log(self) -> Path:
        return self.workdir / "regtest" / "debug.log"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 30.0) -> BcoinNode:
        if self.running:
            return self
        if not BCOIN_BIN.exists():
            raise RuntimeError(f"bcoin not installed at {BCOIN_BIN}; run `make deps`")
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self.rpc_port:
            self.rpc_port, self.wallet_port = free_port(), free_port()
        args = [
            *_pdeathsig_prefix(), "node", str(BCOIN_BIN), "--network=regtest",
            f"--prefix={self.workdir}", f"--wallet-prefix={self.workdir}",
            "--http-host=127.0.0.1", f"--http-port={self.rpc_port}", f"--api-key={self.api_key}",
            f"--wallet-http-port={self.wallet_port}",
            "--workers=false", "--listen=false", "--only=127.0.0.1:1",
            "--index-tx=true", "--index-address=true",
        ]  # fmt: skip
        with open(self.workdir / "node.out", "ab") as out:
            self.proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        _live.add(self)
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is None or self.proc.poll() is not None:
                tail = (self.workdir / "node.out").read_text(errors="replace")[-2000:]
                self.stop()
                raise RuntimeError(f"bcoin exited during start-up:\n{tail}")
            try:
                self.rpc("getblockcount")
                return
            except (OSError, BcoinRpcError):
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"bcoin RPC not up after {timeout}s") from None
                time.sleep(0.05)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        _live.discard(self)
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            proc.wait()

    def restart(self) -> BcoinNode:
        self.stop()
        return self.start()

    # --- RPC -----------------------------------------------------------------------------

    def rpc(self, method: str, *params, timeout: float = 30.0):
        """JSON-RPC call; raises BcoinRpcError with the node's message, OSError when down."""
        self._ids += 1
        body = json.dumps({"jsonrpc": "1.0", "id": self._ids, "method": method, "params": list(params)})
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.rpc_port}/", data=body.encode(), method="POST",
            headers={
                "Content-Type": "application/json",
                "Authorization": "Basic " + base64.b64encode(f"x:{self.api_key}".encode()).decode(),
            },
        )  # fmt: skip
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                answer = json.load(resp)
        except urllib.error.HTTPError as exc:
            try:
                answer = json.loads(exc.read())
            except ValueError:
                raise exc from None
            finally:
                exc.close()
        if answer.get("error"):
            err = answer["error"]
            raise BcoinRpcError(method, err.get("code", 0), err.get("message", str(err)))
        return answer["result"]

    def mine(self, n: int, address: str) -> list[str]:
        """Mine `n` blocks paying `address`; returns the block hashes."""
        return self.rpc("generatetoaddress", n, address)

    def height(self) -> int:
        return self.rpc("getblockcount")

    def mempool_has(self, txid: str) -> bool:
        try:
            self.rpc("getmempoolentry", txid)
            return True
        except BcoinRpcError:
            return False

    def reject_reason(self, txid: str) -> str | None:
        """Why the mempool refused `txid`, read from debug.log (sendrawtransaction does not say).

        e.g. "bad-txns-inputs-spent (code=duplicate)", "mandatory-script-verify-flag-failed ...",
        "orphan: missing inputs" (bcoin keeps such a tx in its orphan pool, not the mempool)."""
        if not self.debug_log.exists():
            return None
        for line in reversed(self.debug_log.read_text(errors="replace").splitlines()):
            if f"hash={txid}" in line and "Verification failure:" in line:
                m = re.search(r"Verification failure: (.*?) \(code=(\w+)", line)
                return f"{m.group(1)} (code={m.group(2)})" if m else line
            if "orphaned in mempool" in line and txid in line:
                return "orphan: missing inputs"
        return None

    def __repr__(self) -> str:
        return f"BcoinNode({self.workdir}, rpc_port={self.rpc_port}, running={self.running})"


@atexit.register
def _stop_all() -> None:
    for node in list(_live):
        node.stop()
