"""Batch runs that skip bad cases: the ``failures.csv`` record and a loading loop that goes on.

A batch (convert, detect, segment...) must not stop at the first damaged scan: each case that fails
with a :class:`~medidiff.errors.MedidiffError` is written to ``<out>/failures.csv`` (columns ``case``,
``file``, ``error``, ``fix``) at once, atomically, and the loop moves to the next case. Any other
exception is a bug and is raised.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from medidiff.errors import MedidiffError
from medidiff.outputs import write_table

__all__ = ["FAILURES_FILE", "FailureLog", "iter_loaded"]

FAILURES_FILE = "failures.csv"
COLUMNS = ("case", "file", "error", "fix")


class FailureLog:
    """Records skipped cases into ``<out_dir>/failures.csv``, rewriting it atomically after each one.

    The file is only created once a failure is recorded, so a clean run leaves none behind.

    Args:
        out_dir: the run's output folder (created if needed).
    """

    def __init__(self, out_dir: str | Path):
        self.path = Path(out_dir) / FAILURES_FILE
        self.rows: list[dict[str, str]] = []

    def __len__(self) -> int:
        return len(self.rows)

    def record(self, case: str, error: BaseException | str, file: str | Path | None = None,
               fix: str | None = None) -> None:
        """Adds one failed case and rewrites ``failures.csv``.

        Args:
            case: the case name.
            error: the exception (its ``where``/``message``/``fix`` are used when it is a
                MedidiffError) or a message.
            file: the file concerned (default: the error's ``where``).
            fix: what to do (default: the error's ``fix``).
        """
        if isinstance(error, MedidiffError):
            message, file, fix = error.message, file or error.where, fix or error.fix
        else:
            message = str(error)
        self.rows.append(dict(zip(COLUMNS, (case, str(file or ""), message, fix or ""))))
        self._write()

    def extend(self, rows: Iterable[dict[str, str]]) -> None:
        """Adds already formed rows (``case``, ``file``, ``error``, ``fix``) and writes ``failures.csv`` once.

        Args:
            rows: failure rows, e.g. gathered from every rank's case records (``medidiff.batch``).
        """
        added = [{k: str(row.get(k, "") or "") for k in COLUMNS} for row in rows]
        if added:
            self.rows += added
            self._write()

    def _write(self) -> None:
        write_table(self.rows, self.path)


def iter_loaded(sources: Iterable[Any], log: FailureLog, loader: Callable[[Any], Any] | None = None
                ) -> Iterator[tuple[Any, Any]]:
    """Loads each case, yielding ``(source, item)``; a case whose loading fails is recorded and skipped.

    Args:
        sources: cases, e.g. from :func:`medidiff.data.discover.discover`.
        log: where failures go.
        loader: turns a source into an item (default: :func:`medidiff.data.discover.load`).

    Yields:
        ``(source, loaded item)`` for each case that could be loaded.
    """
    if loader is None:
        from medidiff.data.discover import load as loader
    for source in sources:
        try:
            item = loader(source)
        except MedidiffError as err:
            log.record(getattr(source, "name", str(source)), err)
            continue
        yield source, item
