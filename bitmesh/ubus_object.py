"""The ubus objects of the service (python3-ubus): a thin adapter over bitmesh.control.Control.

    ubus call bitmesh status
    ubus call bitmesh kick '{"mac": "aa:bb:cc:dd:ee:ff"}'
    ubus listen 'bitmesh.*'

python3-ubus checks a call's arguments before Python sees it: every argument must be named in
the method's signature and every named one must be there, else the caller gets ubus status 2
(Invalid argument). uhttpd's /ubus (LuCI) adds `ubus_rpc_session` to every call it forwards, so
one signature cannot serve both the command line and LuCI. Two objects with the same methods:

- `bitmesh`: for `ubus call` and scripts, exactly the documented arguments;
- `luci.bitmesh`: for LuCI through uhttpd and rpcd's ACL, the same plus `ubus_rpc_session`.

One thread owns the connection (libubus is not thread-safe): it serves calls in `ubus.loop()`
(which releases the GIL while it waits), sends the events other threads queue, and reconnects
and registers again when ubusd restarts. libubox's uloop installs its own SIGCHLD handler, which
reaps every child of the process, unless one is already set: `own_sigchld()` sets Python's first,
or a failing `nft` run from another thread would be reported as a success.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
from collections.abc import Callable

from bitmesh.channel.state import Channel
from bitmesh.control import Control, Event, events_for
from bitmesh.errors import answer

log = logging.getLogger(__name__)

OBJECT = "bitmesh"
LUCI_OBJECT = "luci.bitmesh"
SESSION_ARGUMENT = "ubus_rpc_session"  # added by uhttpd to every call from LuCI
# method -> {argument: blobmsg type}; the Control method of the same name does the work.
METHODS: dict[str, dict[str, str]] = {
    "status": {},
    "clients": {},
    "channels": {},
    "kick": {"mac": "string"},
    "close_channel": {"channel_id": "string"},
    "earnings": {},
    "fleet": {},
    "reload": {},
}
LOOP_MS = 1000  # how long one ubus.loop() waits before queued events are sent
RECONNECT_S = (0.2, 5.0)  # first and longest wait between attempts to reach ubusd again
CHECK_EVERY = 30  # loop passes between lookups of our own object on ubusd


def signatures(with_session: bool) -> dict[str, dict[str, str]]:
    """The methods' argument types as registered: LuCI's object also takes the session."""
    extra = {SESSION_ARGUMENT: "string"} if with_session else {}
    return {name: {**args, **extra} for name, args in METHODS.items()}


def call(control: Control, method: str, args: dict | None) -> dict:
    """One method call: the arguments the method takes (the session is uhttpd's, not ours),
    a refusal answered as {"error": {"code", "message"}}."""
    if method not in METHODS:
        return {"error": {"code": "method_unknown", "message": f"no method {method!r}"}}
    wanted = {name: (args or {}).get(name) for name in METHODS[method]}
    return answer(f"ubus {method}", lambda: getattr(control, method)(**wanted))[1]


def _ignore_sigchld(signum, frame) -> None:
    """A handler that does nothing: Python's subprocess reaps its own children."""


def own_sigchld() -> None:
    """Set a Python SIGCHLD handler (main thread only, before the first ubus.loop()) so that
    uloop leaves SIGCHLD alone: its handler would reap our `nft` processes before subprocess
    reads their exit status (reported as 0)."""
    if signal.getsignal(signal.SIGCHLD) in (signal.SIG_DFL, None):
        signal.signal(signal.SIGCHLD, _ignore_sigchld)


class UbusObject:
    def __init__(self, control: Control, socket_path: str | None = None, ubus_module=None):
        self.control = control
        self.socket_path = socket_path
        self._ubus = ubus_module
        self._events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._socket_id: tuple[int, int, int] | None = None  # the socket file we joined

    def on_channel(self, new: Channel, old: Channel | None) -> None:
        """A ChannelManager listener: queue what the change announces."""
        for event in events_for(new, old):
            self._events.put(event)

    def start(self) -> None:
        """Register the objects and serve them in a thread. Raises ImportError without
        python3-ubus; without ubusd (yet) the thread keeps trying."""
        if self._ubus is None:
            import ubus  # python3-ubus: on OpenWrt, or built against OpenWrt's libubus

            self._ubus = ubus
        own_sigchld()
        try:
            self._register()
        except OSError as e:
            log.warning("ubusd not reachable (%s); the ubus objects will be registered once it is", e)
        self.control.service.manager.listeners.append(self.on_channel)
        self._thread = threading.Thread(target=self._loop, name="ubus", daemon=True)
        self._thread.start()

    def _path(self) -> str:
        return self.socket_path or "/var/run/ubus/ubus.sock"

    def _socket_identity(self) -> tuple[int, int, int] | None:
        """Which socket file is there: a new ubusd makes a new one (the inode number may be the
        old one's again, its change time is not)."""
        try:
            st = os.stat(self._path())
        except OSError:
            return None
        return st.st_dev, st.st_ino, st.st_ctime_ns

    def _register(self) -> None:
        ubus = self._ubus
        identity = self._socket_identity()
        if self.socket_path:
            ubus.connect(socket_path=self.socket_path)
        else:
            ubus.connect()
        try:
            for name, with_session in ((OBJECT, False), (LUCI_OBJECT, True)):
                ubus.add(name, {
                    method: {"method": self._handler(method),
                             "signature": {arg: getattr(ubus, f"BLOBMSG_TYPE_{kind.upper()}")
                                           for arg, kind in args.items()}}
                    for method, args in signatures(with_session).items()
                })  # fmt: skip
        except Exception:
            ubus.disconnect(deregister=False)
            raise
        self._socket_id = identity
        log.info("ubus objects %s and %s registered", OBJECT, LUCI_OBJECT)

    def _handler(self, method: str) -> Callable:
        def handle(request, data) -> None:
            request.reply(call(self.control, method, data))

        return handle

    def _loop(self) -> None:
        passes = 0
        while not self._stop.is_set():
            # A restarted ubusd is a new socket file and has forgotten our objects (libubus does
            # not tell: loop() and send() carry on as if connected). A stat per pass sees it; a
            # lookup now and then catches anything else.
            if (not self._ubus.get_connected() or self._socket_identity() != self._socket_id
                    or (passes % CHECK_EVERY == CHECK_EVERY - 1 and not self._alive())):
                self._reconnect()
                continue
            self._ubus.loop(LOOP_MS)
            passes += 1
            self._send_events()
        self._send_events()
        if self._ubus.get_connected():
            self._ubus.disconnect()

    def _alive(self) -> bool:
        """Whether ubusd still knows our object."""
        try:
            return OBJECT in self._ubus.objects(OBJECT)
        except RuntimeError:
            return False

    def _reconnect(self) -> None:
        """Connect and register again, waiting longer between tries; returns when registered
        or stopping."""
        if self._socket_id is not None:
            log.warning("ubusd connection lost; registering the ubus objects again")
        wait = RECONNECT_S[0]
        while not self._stop.is_set():
            if self._ubus.get_connected():
                self._ubus.disconnect(deregister=False)
            try:
                self._register()
                return
            except (OSError, RuntimeError) as e:  # ubusd not back yet (or not taking our objects)
                log.debug("ubusd not reachable yet: %s", e)
            self._stop.wait(wait)
            wait = min(wait * 2, RECONNECT_S[1])

    def _send_events(self) -> None:
        if self._socket_identity() != self._socket_id:
            return  # ubusd is gone or new: keep them for after the reconnect (send() would drop them)
        while True:
            try:
                name, data = self._events.get_nowait()
            except queue.Empty:
                return
            try:
                self._ubus.send(name, data)
            except Exception:
                log.exception("ubus event %s not sent", name)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(LOOP_MS / 1000 * 3)
