"""Batch runs over many cases, for every task: sharded across ranks, resumable, and gathered on rank 0.

A task hands its list of cases and a function that processes one case to :class:`Batch`:

- **sharding**: under ``torchrun`` each rank takes every ``world_size``-th case (``shard``), so each case
  is processed and written by exactly one rank; without ``torchrun`` the one process takes all;
- **completion records**: once every file of a case is written (each atomically, by
  ``medidiff.outputs``), the case's record ``<out>/.medidiff/<stage>/<case>.json`` is written, itself
  atomically, holding the SHA-256 of each output and input file, the case's table row, and a
  fingerprint of the settings; arrays the run's summary needs (e.g. maps for metrics) go beside it as
  ``<case>.safetensors``. A case is *complete* only when its record exists, its fingerprint matches and
  every checksum still holds;
- **resume**: a run started again (after a crash, ``SIGKILL`` or a power cut) skips the complete cases
  and redoes the rest; temporary files of interrupted writes are swept away first;
- **the folder lock** (``medidiff.outputs.lock.RunLock``): rank 0 holds it for the whole batch;
- **gathering**: after all ranks are done (a barrier), rank 0 reads every case's record in the input
  order (rows, arrays, files, inputs, failures), so the run's tables are the same whatever the number
  of ranks and however often the run was interrupted.

Cases that fail with a ``MedidiffError`` get a failure record (and so a row of ``failures.csv``) and are
tried again by the next run; other exceptions are bugs and propagate. The output folder must be one
folder seen by all ranks (a local disk for one machine, a shared file system across machines).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .errors import MedidiffError
from .manifest import sha256_file
from .outputs import atomic_write, write_json
from .outputs.lock import RunLock
from .runtime import Dist, init_distributed

__all__ = ["STATE_DIR", "CaseOutput", "BatchResult", "Batch", "fingerprint", "shard", "source_files"]

log = logging.getLogger("medidiff.batch")

#: Where completion records live, inside the output folder.
STATE_DIR = ".medidiff"
_TEMPORARY = re.compile(r"^\..+\.tmp[^/]*$")
_RECORD_FORMAT = 1


def fingerprint(settings: Any) -> str:
    """SHA-256 of the JSON form of ``settings`` (keys sorted): what must match for a case to be reused."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def shard(items: Sequence[Any], rank: int, world_size: int) -> list[Any]:
    """The items of one rank: every ``world_size``-th, starting at ``rank`` (a partition of ``items``)."""
    return list(items[rank::world_size])


def source_files(source: Any) -> list[Path]:
    """Every input file of a case's source (image files, mask, label, annotations) that exists."""
    paths = [*getattr(source, "paths", []), getattr(source, "mask", None), getattr(source, "label", None),
             *getattr(source, "annotations", [])]
    return [Path(p) for p in paths if p is not None and Path(p).is_file()]


@dataclass
class CaseOutput:
    """What processing one case produced.

    Attributes:
        files: the files written for the case (all complete).
        row: the case's row of the run's table (JSON-able values).
        arrays: tensors the run's summary needs later (e.g. maps for pooled metrics), stored with the record.
        inputs: the files read for the case (default: ``source_files(source)``).
    """

    files: list[Path]
    row: dict[str, Any]
    arrays: dict[str, torch.Tensor] = field(default_factory=dict)
    inputs: list[Path] | None = None


@dataclass
class BatchResult:
    """A stage's cases gathered on rank 0, in input order.

    Attributes:
        rows: the rows of the completed cases.
        arrays: per completed case name, its stored arrays.
        files: every output file of the completed cases.
        inputs: every input file they read.
        failures: ``failures.csv`` rows (``case``, ``file``, ``error``, ``fix``) of the failed cases.
        resumed: how many cases were complete from an earlier run (on any rank).
    """

    rows: list[dict[str, Any]] = field(default_factory=list)
    arrays: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    inputs: list[Path] = field(default_factory=list)
    failures: list[dict[str, str]] = field(default_factory=list)
    resumed: int = 0


class Batch:
    """One batch run in an output folder: the process group, the lock, the records (a context manager).

    Args:
        out_dir: the run's output folder.
        device: this process's device (gloo joins CPU ranks, nccl CUDA ranks).
        progress: show a progress bar per rank.
    """

    def __init__(self, out_dir: str | Path, device: torch.device, *, progress: bool = False):
        self.out_dir = Path(out_dir)
        self.device = device
        self.progress = progress
        self.dist = Dist()
        self._lock: RunLock | None = None

    # ------------------------------------------------------------------------------------------ set-up

    @property
    def rank(self) -> int:
        return self.dist.rank

    @property
    def world_size(self) -> int:
        return self.dist.world_size

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    def __enter__(self) -> Batch:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.dist = init_distributed(self.device)
        if self.is_main:
            try:
                self._lock = RunLock(self.out_dir).acquire()
                self._sweep()
            except BaseException:
                self.dist.close()
                raise
        self.dist.barrier()  # no rank writes before rank 0 holds the folder
        return self

    def __exit__(self, *exc) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        self.dist.close()

    def _sweep(self) -> None:
        """Remove temporary files that interrupted writes left behind (only the lock holder does this)."""
        for path in self.out_dir.rglob(".*"):
            if path.is_file() and _TEMPORARY.match(path.name):
                log.info("removing %s, left by an interrupted write", path)
                path.unlink(missing_ok=True)

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (pickled only between the run's own processes)."""
        if not self.dist.active:
            return value
        box = [value if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def shard(self, items: Sequence[Any]) -> list[Any]:
        """This rank's share of ``items``."""
        return shard(items, self.rank, self.world_size)

    # ----------------------------------------------------------------------------------------- records

    def _folder(self, stage: str) -> Path:
        return self.out_dir / STATE_DIR / stage

    def _record_path(self, stage: str, name: str) -> Path:
        return self._folder(stage) / f"{name}.json"

    def _relative(self, path: Path) -> str:
        try:
            return str(Path(path).resolve().relative_to(self.out_dir.resolve()))
        except ValueError:
            return str(path)

    def _absolute(self, key: str) -> Path:
        path = Path(key)
        return path if path.is_absolute() else self.out_dir / path

    def read_record(self, stage: str, name: str) -> dict | None:
        """A case's record as written, or ``None`` when there is none or it is unreadable."""
        try:
            record = json.loads(self._record_path(stage, name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) and record.get("format") == _RECORD_FORMAT else None

    def completed(self, stage: str, name: str, key: str, inputs: Iterable[Path]) -> dict | None:
        """The record of a complete case: written with settings ``key``, its inputs and outputs unchanged."""
        record = self.read_record(stage, name)
        if record is None or record.get("status") != "done" or record.get("fingerprint") != key:
            return None
        wanted = {str(p): sha256_file(p) for p in inputs}
        if record.get("inputs") != wanted:
            return None
        for rel, digest in record.get("files", {}).items():
            path = self._absolute(rel)
            if not path.is_file() or sha256_file(path) != digest:
                log.info("%s: %s changed or is missing; the case is done again", name, rel)
                return None
        return record

    def _write_record(self, stage: str, name: str, record: dict) -> None:
        write_json({"format": _RECORD_FORMAT, "case": name, "rank": self.rank, **record},
                   self._record_path(stage, name))

    def record_done(self, stage: str, name: str, key: str, output: CaseOutput, inputs: list[Path]) -> dict:
        """Write a case's arrays, then its completion record (the last write: the case is complete)."""
        files = list(output.files)
        if output.arrays:
            from safetensors.torch import save

            tensors = {k: v.detach().cpu().contiguous().clone() for k, v in output.arrays.items()}
            path = self._folder(stage) / f"{name}.safetensors"
            with atomic_write(path) as tmp:
                tmp.write_bytes(save(tensors))
            files.append(path)
        record = {"status": "done", "fingerprint": key, "row": output.row,
                  "inputs": {str(p): sha256_file(p) for p in inputs},
                  "files": {self._relative(p): sha256_file(p) for p in files},
                  "arrays": sorted(output.arrays)}
        self._write_record(stage, name, record)
        return record

    def record_failed(self, stage: str, name: str, error: MedidiffError, inputs: list[Path]) -> None:
        """Write a case's failure record (the case is tried again by the next run)."""
        self._write_record(stage, name, {"status": "failed", "inputs": {str(p): "" for p in inputs},
                                         "error": {"file": error.where or "", "message": error.message,
                                                   "fix": error.fix or ""}})

    def _arrays(self, stage: str, name: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self._folder(stage) / f"{name}.safetensors"))

    # ---------------------------------------------------------------------------------------- the loop

    def run(self, sources: Sequence[Any], process: Callable[[Any], CaseOutput], *, key: str,
            stage: str = "cases", name: Callable[[Any], str] = lambda s: s.name,
            inputs: Callable[[Any], list[Path]] = source_files) -> BatchResult | None:
        """Process this rank's share of the cases not yet complete, then gather all on rank 0.

        Args:
            sources: every case of the run, in the same order on every rank.
            process: processes one case; raises a ``MedidiffError`` for a bad case.
            key: the settings' fingerprint (see :func:`fingerprint`); records made with another are redone.
            stage: the records' folder (``cases``, ``calibration``...), one per loop of a run.
            name: a case's unique, file-safe name.
            inputs: a case's input files (checksummed into its record).

        Returns:
            On rank 0, the gathered :class:`BatchResult`; on other ranks ``None``.
        """
        names = [name(s) for s in sources]
        if len(set(names)) != len(names):
            raise ValueError(f"case names must be unique within a batch ({stage})")
        mine = self.shard(list(zip(names, sources)))
        resumed = 0
        for case, source in tqdm(mine, desc=stage, disable=not self.progress, leave=False):
            files_in = inputs(source)
            if self.completed(stage, case, key, files_in) is not None:
                log.info("%s: complete from an earlier run, skipped", case)
                resumed += 1
                continue
            try:
                output = process(source)
            except MedidiffError as e:
                log.warning("skipped %s: %s", case, e)
                self.record_failed(stage, case, e, files_in)
                continue
            self.record_done(stage, case, key, output, output.inputs if output.inputs is not None else files_in)
        counts = self._gather_counts(resumed)
        self.dist.barrier()
        if not self.is_main:
            return None
        return self._collect(stage, names, counts)

    def _gather_counts(self, resumed: int) -> int:
        if not self.dist.active:
            return resumed
        total = torch.tensor([resumed], dtype=torch.int64)
        dist.all_reduce(total)
        return int(total.item())

    def _collect(self, stage: str, names: list[str], resumed: int) -> BatchResult:
        result = BatchResult(resumed=resumed)
        for case in names:
            record = self.read_record(stage, case)
            if record is None:
                result.failures.append({"case": case, "file": "", "error": "no record (its rank ended early)",
                                        "fix": "run the same command again."})
                continue
            if record.get("status") != "done":
                error = record.get("error", {})
                result.failures.append({"case": case, "file": error.get("file", ""),
                                        "error": error.get("message", ""), "fix": error.get("fix", "")})
                continue
            result.rows.append(record["row"])
            if record.get("arrays"):
                result.arrays[case] = self._arrays(stage, case)
            result.files += [self._absolute(k) for k in record["files"] if not k.startswith(STATE_DIR)]
            result.inputs += [Path(p) for p in record["inputs"]]
        return result
