"""The uplink book on flash: one small JSON file, replaced atomically (written, synced, renamed,
directory synced: bitmesh.channel.storage.Disk), mode 0600 (it names the upstream channel).

Written before every uplink payment leaves (its `signed_max`), when a channel opens (before it
is funded) and when one is retired: a few writes per prepay step of upstream use, never per
packet. The client key is not in it: the wallet re-derives it from the seed and the number.
"""

from __future__ import annotations

import json
from pathlib import Path

from bitmesh.channel.storage import Disk
from bitmesh.errors import ConfigError
from bitmesh.tariff import Tariff
from bitmesh.uplink.buyer import Book, UplinkChannel

VERSION = 1


def book_to_json(book: Book) -> dict:
    ch = book.channel
    return {"version": VERSION, "spent_closed": book.spent_closed, "next_number": book.next_number,
            "history": book.history,
            "channel": None if ch is None else {
                "number": ch.number, "channel_id": ch.channel_id, "deposit": ch.deposit,
                "prepay_step": ch.prepay_step, "tariff": ch.tariff.to_json(), "paid": ch.paid,
                "signed_max": ch.signed_max}}


def book_from_json(data: dict) -> Book:
    ch = data.get("channel")
    channel = None if ch is None else UplinkChannel(
        int(ch["number"]), str(ch["channel_id"]), int(ch["deposit"]), int(ch["prepay_step"]),
        Tariff(int(ch["tariff"]["sat_per_mb"]), int(ch["tariff"]["sat_per_minute"])), int(ch["paid"]),
        int(ch["signed_max"]))
    return Book(int(data["spent_closed"]), int(data["next_number"]), channel, list(data.get("history", [])))


class BookStore:
    def __init__(self, path: Path, disk: Disk | None = None):
        self.path = path
        self.disk = disk or Disk()
        self.extra: dict = {}  # what the runner keeps beside the book (the open channel's terms)

    def load(self) -> Book:
        if not self.path.exists():
            return Book()
        try:
            data = json.loads(self.path.read_text())
            if data.get("version") != VERSION:
                raise ValueError(f"version {data.get('version')!r}")
            book = book_from_json(data)
        except (ValueError, KeyError, TypeError) as e:
            # Never a fresh book over an unreadable one: it would forget what the budget spent.
            raise ConfigError(f"{self.path}: unreadable uplink book ({e}); fix or remove it knowingly",
                              code="uplink_book_invalid") from None
        self.extra = dict(data.get("extra") or {})
        return book

    def save(self, book: Book) -> None:
        """On disk and synced, or StorageError (and the caller sends nothing)."""
        data = book_to_json(book)
        data["extra"] = self.extra
        self.disk.write_file(self.path, [json.dumps(data, sort_keys=True).encode()])
