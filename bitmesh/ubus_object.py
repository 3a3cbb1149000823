"""The ubus object `bitmesh` (python3-ubus): a thin adapter over bitmesh.control.Control.

    ubus call bitmesh status
    ubus call bitmesh kick '{"mac": "aa:bb:cc:dd:ee:ff"}'
    ubus listen 'bitmesh.*'

One thread owns the ubus connection (libubus is not thread-safe): it serves calls in
`ubus.loop()` (which releases the GIL while it waits) and sends the events other threads
queue. rpcd's ACL (luci-app-bitmesh) grants LuCI exactly the methods its views use.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

from bitmesh.channel.state import Channel
from bitmesh.control import Control, Event, events_for
from bitmesh.errors import answer

log = logging.getLogger(__name__)

OBJECT = "bitmesh"
# method -> {argument: blobmsg type}; the Control method of the same name does the work.
METHODS: dict[str, dict[str, str]] = {
    "status": {},
    "clients": {},
    "channels": {},
    "kick": {"mac": "string"},
    "close_channel": {"channel_id": "string"},
    "earnings": {},
    "reload": {},
}
LOOP_MS = 1000  # how long one ubus.loop() waits before queued events are sent


def call(control: Control, method: str, args: dict | None) -> dict:
    """One method call as ubus makes it: unknown arguments are ignored (as blobmsg policies
    do), a refusal is answered as {"error": {"code", "message"}}."""
    if method not in METHODS:
        return {"error": {"code": "method_unknown", "message": f"no method {method!r}"}}
    wanted = {name: (args or {}).get(name) for name in METHODS[method]}
    return answer(f"ubus {method}", lambda: getattr(control, method)(**wanted))[1]


class UbusObject:
    def __init__(self, control: Control, socket_path: str | None = None, ubus_module=None):
        self.control = control
        self.socket_path = socket_path
        self._ubus = ubus_module
        self._events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def on_channel(self, new: Channel, old: Channel | None) -> None:
        """A ChannelManager listener: queue what the change announces."""
        for event in events_for(new, old):
            self._events.put(event)

    def start(self) -> None:
        ubus = self._ubus
        if ubus is None:
            import ubus  # python3-ubus: on OpenWrt only
        self._ubus = ubus
        if self.socket_path:
            ubus.connect(socket_path=self.socket_path)
        else:
            ubus.connect()
        ubus.add(OBJECT, {
            name: {"method": self._handler(name),
                   "signature": {arg: getattr(ubus, f"BLOBMSG_TYPE_{kind.upper()}") for arg, kind in args.items()}}
            for name, args in METHODS.items()
        })  # fmt: skip
        self.control.service.manager.listeners.append(self.on_channel)
        self._thread = threading.Thread(target=self._loop, name="ubus", daemon=True)
        self._thread.start()
        log.info("ubus object %s registered", OBJECT)

    def _handler(self, method: str) -> Callable:
        def handle(request, data) -> None:
            request.reply(call(self.control, method, data))

        return handle

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._ubus.loop(LOOP_MS)
            self._send_events()
        self._send_events()
        self._ubus.disconnect()

    def _send_events(self) -> None:
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
