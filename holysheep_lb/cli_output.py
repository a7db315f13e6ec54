"""Terminal output of the ``holysheep-lb`` command: tables, progress, JSON, error lines.

Uses ``rich`` when it is installed (``pip install 'holysheep-lb[cli]'``) and plain text
otherwise. Results go to stdout; progress and notes go to stderr, so ``--json`` output
stays machine-readable. Progress callbacks are thread-safe (load generators call them
from worker threads).
"""

from __future__ import annotations

import contextlib
import json
import threading
from types import SimpleNamespace
from typing import IO, Any, Callable, Iterator, List, Optional, Sequence

__all__ = ["Output", "load_rich"]

ProgressCallback = Callable[[int, int], None]


def load_rich() -> Optional[SimpleNamespace]:
    """The rich classes the CLI uses, or None when rich is not installed."""
    try:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
        from rich.table import Table
    except ImportError:
        return None
    return SimpleNamespace(Console=Console, Table=Table, Progress=Progress, BarColumn=BarColumn,
                           MofNCompleteColumn=MofNCompleteColumn, TextColumn=TextColumn,
                           TimeElapsedColumn=TimeElapsedColumn)


class Output:
    """Where the CLI writes. ``json_mode`` silences tables, notes and progress."""

    def __init__(self, stdout: IO[str], stderr: IO[str], *, json_mode: bool = False,
                 rich: Optional[SimpleNamespace] = None) -> None:
        self.stdout = stdout
        self.stderr = stderr
        self.json_mode = json_mode
        self.rich = rich
        if rich is not None:
            # rich assumes 80 columns when stdout is not a terminal: too narrow for our tables
            width = None if getattr(stdout, "isatty", lambda: False)() else 120
            self._console = rich.Console(file=stdout, highlight=False, soft_wrap=False, width=width)
            self._err_console = rich.Console(file=stderr, highlight=False)

    # -- results (stdout) -----------------------------------------------------------

    def write(self, text: str) -> None:
        """Raw text to stdout, flushed (streamed answers)."""
        self.stdout.write(text)
        self.stdout.flush()

    def line(self, text: str = "") -> None:
        if not self.json_mode:
            self.write(text + "\n")

    def json(self, obj: Any, *, indent: Optional[int] = 2) -> None:
        self.write(json.dumps(obj, indent=indent, default=str) + "\n")

    def table(self, title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]],
              *, align: Optional[str] = None) -> None:
        """A titled table. ``align`` has one ``l``/``r`` per column (default: ``l`` then ``r``s)."""
        if self.json_mode:
            return
        align = align or "l" + "r" * (len(columns) - 1)
        cells = [["-" if v is None else str(v) for v in row] for row in rows]
        if self.rich is not None:
            table = self.rich.Table(title=title, title_justify="left")
            for name, how in zip(columns, align):
                table.add_column(name, justify="left" if how == "l" else "right", no_wrap=True)
            for row in cells:
                table.add_row(*row)
            self._console.print(table)
            return
        widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]

        def fmt(row: Sequence[str]) -> str:
            return "  ".join(v.ljust(w) if how == "l" else v.rjust(w)
                             for v, w, how in zip(row, widths, align)).rstrip()

        lines: List[str] = [title, fmt(columns), fmt(["-" * w for w in widths])]
        lines.extend(fmt(r) for r in cells)
        self.write("\n".join(lines) + "\n\n")

    # -- notes and progress (stderr) ------------------------------------------------

    def note(self, text: str) -> None:
        if not self.json_mode:
            self.stderr.write(text + "\n")
            self.stderr.flush()

    def error(self, text: str) -> None:
        """One line, always (also in JSON mode): ``holysheep-lb: error: ...``."""
        self.stderr.write("holysheep-lb: error: " + " ".join(text.split()) + "\n")
        self.stderr.flush()

    @contextlib.contextmanager
    def progress(self, label: str, total: int) -> Iterator[ProgressCallback]:
        """A ``callback(done, total)`` drawing a progress bar on stderr while the block runs."""
        if self.json_mode:
            yield _ignore
        elif self.rich is not None:
            r = self.rich
            with r.Progress(r.TextColumn("{task.description}"), r.BarColumn(), r.MofNCompleteColumn(),
                            r.TimeElapsedColumn(), console=self._err_console) as bar:
                task = bar.add_task(label, total=total)
                yield lambda done, _total: bar.update(task, completed=done)
        else:
            plain = _PlainProgress(self.stderr, label, total)
            try:
                yield plain.update
            finally:
                plain.finish()


def _ignore(done: int, total: int) -> None:
    return None


class _PlainProgress:
    """``label  done/total  pct%``: redrawn in place on a terminal, one line per 10% otherwise."""

    def __init__(self, stream: IO[str], label: str, total: int) -> None:
        self.stream = stream
        self.label = label
        self.total = max(1, total)
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.step = 1 if self.tty else 10
        self._shown = -1 if self.tty else 0  # a log file needs no 0% line
        self._lock = threading.Lock()  # guards _shown and the stream

    def update(self, done: int, total: int) -> None:
        pct = done * 100 // self.total
        with self._lock:
            if self._shown >= 0 and pct // self.step <= self._shown // self.step:
                return
            self._shown = pct
            self._draw(done, pct)

    def _draw(self, done: int, pct: int) -> None:
        text = f"{self.label}  {done}/{self.total}  {pct}%"
        self.stream.write(("\r" + text) if self.tty else (text + "\n"))
        self.stream.flush()

    def finish(self) -> None:
        with self._lock:
            if self.tty:
                self.stream.write("\n")
                self.stream.flush()
