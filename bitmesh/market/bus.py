"""The MQTT transport: one paho client, paho's own network thread, a bounded queue.

The only module that imports paho (paho-mqtt 1.6.1 as OpenWrt 24.10 ships it, and 2.x).
Nothing here blocks a caller: `put_event` and `set_current` append and wake the sender thread.
Events wait in a bounded queue (the oldest go first when it is full); the retained current
values (offer, state, totals) are kept one per topic and published again on every (re)connect,
so a broker that lost them, or a reader that missed them, gets the values of now. paho reconnects
with back-off (1 s doubling to 30 s). Messages are QoS 1; at most `max_inflight` are handed
to paho unacknowledged, so what paho holds across a connection loss stays bounded too.
"""

from __future__ import annotations

import json
import logging
import ssl
import threading
import time
from collections import deque
from dataclasses import dataclass

import paho.mqtt.client as mqtt

log = logging.getLogger(__name__)

EVENT_QUEUE = 1000  # events kept while the broker is away
MAX_INFLIGHT = 100


@dataclass(frozen=True)
class BrokerConfig:
    host: str
    port: int
    username: str = ""
    password: str = ""  # never logged
    tls: bool = False
    ca_file: str = ""  # empty: the system's CAs
    client_id: str = ""
    keepalive: int = 30

    def __repr__(self) -> str:
        return f"BrokerConfig({self.host}:{self.port}, tls={self.tls}, user={'yes' if self.username else 'no'})"


def new_client(config: BrokerConfig, clean_session: bool = True) -> mqtt.Client:
    """A paho client for `config` on paho 1.x or 2.x (callback API version 2 where it exists)."""
    if hasattr(mqtt, "CallbackAPIVersion"):
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=config.client_id, clean_session=clean_session)
    else:
        client = mqtt.Client(client_id=config.client_id, clean_session=clean_session)
    if config.username:
        client.username_pw_set(config.username, config.password or None)
    if config.tls:
        client.tls_set(ca_certs=config.ca_file or None, cert_reqs=ssl.CERT_REQUIRED)
    return client


def _ok(code) -> bool:
    """A CONNACK/DISCONNECT code is success: an int on paho 1.x, a ReasonCode on 2.x."""
    return (getattr(code, "value", code)) == 0


class Bus:
    """Publishes to one broker from its own sender thread; `stop` ends with the offline state."""

    def __init__(self, config: BrokerConfig, will: tuple[str, bytes] | None = None,
                 max_events: int = EVENT_QUEUE, max_inflight: int = MAX_INFLIGHT):
        self.config = config
        self._client = new_client(config)
        self._client.max_inflight_messages_set(max_inflight)
        self._client.reconnect_delay_set(min_delay=1, max_delay=30)
        if will is not None:
            self._client.will_set(will[0], will[1], qos=1, retain=True)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_publish = self._on_publish
        self._events: deque[tuple[str, bytes]] = deque(maxlen=max_events)
        self._current: dict[str, bytes] = {}  # retained topics -> payload
        self._dirty: set[str] = set()  # retained topics to send (again)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._connected = False
        self._inflight: set[int] = set()
        self._acked_early: set[int] = set()
        self._max_inflight = max_inflight
        self._stopping = False
        self.dropped = 0  # events dropped because the queue was full
        self.sent = 0
        self._thread: threading.Thread | None = None
        self._watched: list[str] = []  # topics read back (the fleet view), subscribed on each connect

    # --- callers ---------------------------------------------------------------------------

    def watch(self, topics: list[str], on_message) -> None:
        """Before `start`: also subscribe to `topics` (QoS 1), on every (re)connect, and hand each
        message to `on_message(topic, payload)` on paho's thread (it must not block)."""
        self._watched = list(topics)
        self._client.on_message = lambda client, userdata, msg: on_message(msg.topic, bytes(msg.payload))

    def start(self) -> Bus:
        self._client.connect_async(self.config.host, self.config.port, keepalive=self.config.keepalive)
        self._client.loop_start()  # paho's network thread: connects, reconnects with back-off
        self._thread = threading.Thread(target=self._send_loop, name="mqtt-send", daemon=True)
        self._thread.start()
        return self

    def put_event(self, topic: str, payload: dict | bytes) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload, separators=(",", ":")).encode()
        with self._lock:
            if len(self._events) == self._events.maxlen:
                self.dropped += 1  # deque drops the oldest
            self._events.append((topic, data))
            self._wake.notify()

    def set_current(self, topic: str, payload: dict | bytes) -> None:
        """A retained value: replaces what was waiting for `topic`, sent now and on each reconnect."""
        data = payload if isinstance(payload, bytes) else json.dumps(payload, separators=(",", ":")).encode()
        with self._lock:
            self._current[topic] = data
            self._dirty.add(topic)
            self._wake.notify()

    @property
    def connected(self) -> bool:
        return self._connected

    def pending(self) -> int:
        with self._lock:
            return len(self._events) + len(self._dirty) + len(self._inflight)

    def stop(self, last: tuple[str, bytes] | None = None, timeout: float = 2.0) -> None:
        """Publish `last` (the offline state) if connected, wait a little for what is in flight,
        disconnect (no will then) and end both threads."""
        with self._lock:
            self._stopping = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        if last is not None and self._connected:
            info = self._client.publish(last[0], last[1], qos=1, retain=True)
            try:
                info.wait_for_publish(timeout)
            except (RuntimeError, ValueError, TypeError):  # not queued, or paho 1.x without a timeout
                pass
        self._client.disconnect()
        self._client.loop_stop()

    # --- paho's thread ----------------------------------------------------------------------

    def _on_connect(self, client, userdata, flags, code, *rest) -> None:
        if not _ok(code):
            log.warning("MQTT broker %s:%d refused the connection: %s", self.config.host, self.config.port, code)
            return
        log.info("MQTT connected to %s:%d", self.config.host, self.config.port)
        if self._watched:  # a clean session forgets subscriptions: again on every connect
            client.subscribe([(topic, 1) for topic in self._watched])
        with self._lock:
            self._connected = True
            self._inflight.clear()  # paho re-sends its own unacknowledged messages itself
            self._acked_early.clear()
            self._dirty |= set(self._current)  # the current values again: the broker may have lost them
            self._wake.notify()

    def _on_disconnect(self, client, userdata, *args) -> None:
        with self._lock:
            was = self._connected
            self._connected = False
        if was and not self._stopping:
            log.warning("MQTT connection to %s:%d lost; retrying", self.config.host, self.config.port)

    def _on_publish(self, client, userdata, mid, *rest) -> None:
        with self._lock:
            if mid in self._inflight:
                self._inflight.discard(mid)
            else:  # acknowledged before the sender thread noted it as in flight
                self._acked_early.add(mid)
            self.sent += 1
            self._wake.notify()

    # --- the sender thread -----------------------------------------------------------------

    def _send_loop(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not (
                        self._connected and len(self._inflight) < self._max_inflight
                        and (self._dirty or self._events)):
                    self._wake.wait()
                if self._stopping:
                    return
                if self._dirty:
                    topic = self._dirty.pop()
                    item, retain = (topic, self._current[topic]), True
                else:
                    item, retain = self._events.popleft(), False
            info = self._client.publish(item[0], item[1], qos=1, retain=retain)
            with self._lock:
                if info.rc == mqtt.MQTT_ERR_NO_CONN:
                    # The connection went meanwhile: paho keeps this QoS 1 message and sends it on
                    # reconnect (the current values are sent again anyway).
                    self._connected = False
                elif info.rc != mqtt.MQTT_ERR_SUCCESS:  # not taken: put it back for the next turn
                    if retain:
                        self._dirty.add(item[0])
                    else:
                        self._events.appendleft(item)
                elif info.mid in self._acked_early:
                    self._acked_early.discard(info.mid)
                else:
                    self._inflight.add(info.mid)


class Subscription:
    """A reader: subscribes to `topics` (wildcards allowed) and keeps every message received,
    retained ones included, as (topic, payload, retained, monotonic arrival time). With
    `persistent` (a client_id in `config` needed) the broker keeps QoS 1 messages for it while it
    is away."""

    def __init__(self, config: BrokerConfig, topics: list[str], qos: int = 1, persistent: bool = False):
        self.config = config
        self.topics = topics
        self.qos = qos
        self.messages: list[tuple[str, bytes, bool, float]] = []
        self._new = threading.Condition()
        self.subscribed = threading.Event()
        self.error: str | None = None
        self._client = new_client(config, clean_session=not persistent)
        self._client.reconnect_delay_set(min_delay=1, max_delay=2)
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = lambda *args: self.subscribed.set()
        self._client.on_message = self._on_message

    def _on_connect(self, client, userdata, flags, code, *rest) -> None:
        if not _ok(code):
            self.error = f"broker refused the connection: {code}"
            self.subscribed.set()
            return
        client.subscribe([(topic, self.qos) for topic in self.topics])

    def _on_message(self, client, userdata, msg) -> None:
        with self._new:
            self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain), time.monotonic()))
            self._new.notify_all()

    def start(self, timeout: float = 10.0) -> Subscription:
        """Connect and subscribe (raises ConnectionError when that fails within `timeout`)."""
        self._client.connect_async(self.config.host, self.config.port, keepalive=self.config.keepalive)
        self._client.loop_start()
        if not self.subscribed.wait(timeout) or self.error:
            self.stop()
            raise ConnectionError(self.error or f"no subscription at {self.config.host}:{self.config.port} "
                                                f"within {timeout:.0f} s")
        return self

    def wait_for(self, match, timeout: float) -> tuple[str, bytes, bool, float] | None:
        """The first message (oldest first) for which `match(topic, payload)` holds, waiting up to
        `timeout` seconds for it; None if none came."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self._new:
            while True:
                for m in self.messages[seen:]:
                    if match(m[0], m[1]):
                        return m
                seen = len(self.messages)
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._new.wait(left)

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()
