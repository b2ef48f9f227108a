"""A small progress bar for long work (prepare, training, evaluation): items/s
and ETA on one line of stderr, redrawn in place on a terminal and printed every
few seconds otherwise, so CI logs stay short."""

from __future__ import annotations

import sys
import time


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    def __init__(self, total: int, label: str, unit: str = "img", stream=None, enabled: bool = True):
        self.total, self.label, self.unit = total, label, unit
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.done = 0
        self.start = time.perf_counter()
        self.last_draw = 0.0
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.extra = ""

    def update(self, n: int = 1, extra: str = "") -> None:
        self.done += n
        self.extra = extra or self.extra
        now = time.perf_counter()
        if self.enabled and (now - self.last_draw > (0.2 if self.tty else 5.0) or self.done >= self.total):
            self.last_draw = now
            self._draw(now)

    def rate(self) -> float:
        return self.done / max(time.perf_counter() - self.start, 1e-9)

    def _draw(self, now: float) -> None:
        elapsed = now - self.start
        rate = self.done / max(elapsed, 1e-9)
        frac = self.done / self.total if self.total else 1.0
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        bar = "#" * int(24 * frac) + "-" * (24 - int(24 * frac))
        line = (f"{self.label} [{bar}] {self.done}/{self.total} {rate:,.0f} {self.unit}/s "
                f"elapsed {_duration(elapsed)} eta {_duration(eta)}{' ' + self.extra if self.extra else ''}")
        self.stream.write(("\r" + line + "\033[K") if self.tty else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()
