"""The one exception media steps raise for bad input: a stable reason plus detail."""

from __future__ import annotations

__all__ = ["MediaRejected"]


class MediaRejected(ValueError):
    """A media record is rejected; ``reason`` is a stable counter/DLQ key, ``detail`` is for humans."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}" if detail else reason)
