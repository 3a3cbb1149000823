"""A tiny stand-in for python3-ubus (libubus and ubusd are not in Debian), with the calls
bitmesh.ubus_object makes: connect, add, loop, send, disconnect and the BLOBMSG_TYPE_* names.

Instead of ubusd, `connect()` listens on the Unix socket $FAKE_UBUS_DIR/ubus.sock: each
connection sends one JSON line {"object", "method", "args"} and reads back one JSON line, the
handler's reply (what `ubus call` would print). `send()` appends each event as a JSON line to
$FAKE_UBUS_DIR/events.jsonl (what `ubus listen` would print). The real binding is exercised on
an OpenWrt image by qemu/run.sh.
"""

import json
import os
import select
import socket

BLOBMSG_TYPE_ARRAY = 1
BLOBMSG_TYPE_TABLE = 2
BLOBMSG_TYPE_STRING = 3
BLOBMSG_TYPE_INT64 = 4
BLOBMSG_TYPE_INT32 = 5
BLOBMSG_TYPE_INT16 = 6
BLOBMSG_TYPE_INT8 = 7
BLOBMSG_TYPE_BOOL = 7

_server = None
_objects = {}


def _dir():
    return os.environ["FAKE_UBUS_DIR"]


def connect(socket_path=None):
    global _server
    if _server is not None:
        raise RuntimeError("Already connected")
    path = os.path.join(_dir(), "ubus.sock")
    if os.path.exists(path):
        os.unlink(path)
    _server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    _server.bind(path)
    _server.listen(8)


def add(name, methods):
    for spec in methods.values():
        assert callable(spec["method"]) and isinstance(spec["signature"], dict)
    _objects[name] = methods


class _Request:
    def __init__(self):
        self.replies = []

    def reply(self, data):
        json.dumps(data)  # a blobmsg table: JSON-able, or libubus would refuse it too
        self.replies.append(data)


def loop(timeout=-1):
    ready, _, _ = select.select([_server], [], [], None if timeout < 0 else timeout / 1000)
    if not ready:
        return
    conn, _ = _server.accept()
    with conn, conn.makefile("rw") as f:
        call = json.loads(f.readline())
        methods = _objects.get(call["object"], {})
        if call["method"] not in methods:
            f.write(json.dumps({"ubus_error": "Method not found"}) + "\n")
            return
        spec = methods[call["method"]]
        # libubus passes only the arguments the signature names
        args = {k: v for k, v in call.get("args", {}).items() if k in spec["signature"]}
        request = _Request()
        spec["method"](request, args)
        f.write(json.dumps(request.replies[0] if request.replies else {}) + "\n")


def send(event, data):
    with open(os.path.join(_dir(), "events.jsonl"), "a") as f:
        f.write(json.dumps({event: data}) + "\n")


def disconnect():
    global _server
    _server.close()
    _server = None
