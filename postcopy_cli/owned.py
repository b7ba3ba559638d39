"""What every object that owns a kernel resource (an fd, a mapping) shares: ``close()`` is safe to call
twice, a ``with`` block closes it, and so does garbage collection (as inotify_simple's INotify does)."""
from __future__ import annotations


class Owned:
    """Subclasses define ``close()`` (idempotent)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
