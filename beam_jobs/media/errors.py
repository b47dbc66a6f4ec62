"""Media exceptions: bad input (a stable reason plus detail) vs. a configuration error that stops the job."""

from __future__ import annotations

__all__ = ["MediaConfigError", "MediaRejected"]


class MediaRejected(ValueError):
    """A media record is rejected; ``reason`` is a stable counter/DLQ key, ``detail`` is for humans."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class MediaConfigError(RuntimeError):
    """The job is misconfigured for the media it reads (e.g. images without codebooks): never a
    per-record dead letter; it stops the job before any offset of the batch settles."""
