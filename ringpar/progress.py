"""A one-line progress bar for training runs: step, loss and tokens/s, on stderr.

On a terminal the line is redrawn in place (``\\r``); otherwise (a log file, a pipe) one line is
printed every ``every`` steps and at the end, so logs stay short.

Example:
    >>> import io
    >>> out = io.StringIO()
    >>> bar = ProgressBar(total=4, stream=out, width=8, every=2)
    >>> for step in range(4):
    ...     bar.update(step + 1, loss=2.0, tokens_per_s=1000.0)
    >>> bar.close()
    >>> print(out.getvalue().strip().splitlines()[-1])
    [########]   4/4  loss 2.0000  1,000 tok/s
"""

from __future__ import annotations

import sys
import typing as tp

from .validation import positive_int

__all__ = ["ProgressBar", "format_line"]


def format_line(step: int, total: int, loss: float, tokens_per_s: float, width: int = 24) -> str:
    """``[####....]  step/total  loss L  N tok/s``."""
    filled = min(width, width * step // max(total, 1))
    digits = len(str(total))
    return (f"[{'#' * filled}{'.' * (width - filled)}] {step:>{digits + 2}}/{total}  "
            f"loss {loss:.4f}  {tokens_per_s:,.0f} tok/s")


class ProgressBar:
    """Progress of ``total`` steps written to ``stream`` (default ``sys.stderr``).

    Args:
        total: Number of steps.
        stream: A text stream.
        width: Characters of the bar.
        every: Without a terminal, print every ``every`` steps (default: about 20 lines a run).
    """

    def __init__(self, total: int, stream: tp.TextIO | None = None, width: int = 24,
                 every: int | None = None) -> None:
        self.total = positive_int("total", total)
        self.width = positive_int("width", width)
        self.stream = stream if stream is not None else sys.stderr
        self.every = positive_int("every", every) if every is not None else max(1, total // 20)
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last = ""

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        """Show ``step`` (1-based, steps done) with its loss and throughput."""
        self._last = format_line(step, self.total, float(loss), float(tokens_per_s), self.width)
        if self._tty:
            self.stream.write("\r" + self._last)
        elif step % self.every == 0 or step == self.total:
            self.stream.write(self._last + "\n")
        self.stream.flush()

    def close(self) -> None:
        """End the line (terminal)."""
        if self._tty and self._last:
            self.stream.write("\n")
            self.stream.flush()
