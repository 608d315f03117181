"""The public workdir layout (README.md, "The workdir") and the files every stage writes.

    DIR/<stage>/config.json   resolved configuration of the stage
    DIR/<stage>/model.json    registry name, overrides and wrappers needed to rebuild the model
    DIR/<stage>/weights.h5    weights the next stage reloads
    DIR/<stage>/metrics.json  final figures of the stage
    DIR/<stage>/ckpt/         training checkpoints for resuming
    DIR/<stage>/fingerprint.json  what the stage is made from (experiments/fingerprint.py)
    DIR/<stage>/DONE          written last; a stage with DONE is skipped unless --overwrite

Every file is written atomically (temporary file, then rename), so a kill or a full disk never
leaves a half-written artifact under its final name that a later run would trust.
`DIR/.lock` is held (`fcntl.flock`) for the whole run: a second run on the same workdir is refused.
"""

from __future__ import annotations

import fcntl
import json
import os
import pathlib
import shutil
import tempfile
import time

from compress.io import atomic_copy, atomic_path, atomic_write, write_json

__all__ = ["StageDir", "atomic_copy", "lock_workdir", "read_json", "write_json"]


class WorkdirLocked(RuntimeError):
    """Another live process holds the workdir's lock; `pid` is the one it wrote."""

    def __init__(self, path, pid):
        super().__init__(f"{path} is locked by pid {pid}")
        self.pid = pid


def lock_workdir(workdir, name: str = ".lock") -> int:
    """Take `workdir/<name>` for the life of this process (the kernel drops it when the process
    ends, crash or kill included) and write our pid in it. Returns the file descriptor (keep it
    open). Raises WorkdirLocked naming the holder's pid, or OSError if the file cannot be made.
    `.lock` is the writer's; a multi-worker run's other tasks take one each (`lock_name`)."""
    path = pathlib.Path(workdir) / name
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise WorkdirLocked(path, holder) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def lock_name(strategy: str, tf_config: str | None) -> str:
    """The lock file of this process in the workdir: `.lock` for the process that writes the
    workdir (a one-process run; a multi-worker run's chief: `compress.training.chief_task`), `.lock.<type><index>` for another multi-worker task, which
    writes nothing there (StageDir `writes=False`): the chief and its workers share one workdir,
    a second copy of any one of them is refused. Raises ValueError on a TF_CONFIG that is not
    JSON."""
    if strategy != "multi_worker":
        return ".lock"
    try:
        spec = json.loads(tf_config or "{}")
    except json.JSONDecodeError as e:
        raise ValueError(f"TF_CONFIG is not JSON ({e})") from None
    from compress.training import chief_task

    task = spec.get("task") or {}
    kind, index = task.get("type"), int(task.get("index", 0))
    if chief_task(kind, index, spec.get("cluster") or {}):
        return ".lock"
    return f".lock.{kind}{index}"


def read_json(path):
    return json.loads(pathlib.Path(path).read_text())


class StageDir:
    """One stage's folder: `config.json`, `model.json`, `weights.h5`, `metrics.json`, `DONE`.

    `writes=False` is a non-chief worker's view of a multi-worker run: it reads the chief's
    folder (DONE, checkpoints, earlier stages) and writes nothing there, so the chief alone
    writes the stage's files (`save_weights` still saves, to a scratch file: see there).
    """

    def __init__(self, workdir, name: str, *, writes: bool = True):
        self.name = name
        self.writes = writes
        self.path = pathlib.Path(workdir) / name
        self.ckpt = self.path / "ckpt"
        self.weights = self.path / "weights.h5"
        self.record = None  # experiments/fingerprint.py: written as fingerprint.json by begin
        self.provenance = {}  # fingerprint, code, runtime, host: added to metrics.json

    @property
    def done(self) -> bool:
        return (self.path / "DONE").exists()

    def child(self, name: str) -> "StageDir":
        """A stage folder inside this one (the distill stage's labels-only baseline)."""
        return StageDir(self.path, name, writes=self.writes)

    def reset(self) -> None:
        """--overwrite: forget everything this stage computed, DONE first (a kill part-way
        then leaves an unfinished stage, never a stale finished one)."""
        if not self.writes:
            return
        self.clear_done()
        if self.path.exists():
            shutil.rmtree(self.path)

    def clear_done(self) -> None:
        """Mark the stage unfinished (its outputs are no longer complete)."""
        (self.path / "DONE").unlink(missing_ok=True)

    def begin(self, config: dict) -> None:
        if not self.writes:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        write_json(self.path / "config.json", config)
        if self.record is not None:
            write_json(self.path / "fingerprint.json", self.record)

    def save_model_json(self, *, name: str, num_classes: int, overrides: dict | None = None,
                        wrappers: tuple = (), **extra) -> None:
        if not self.writes:
            return
        write_json(self.path / "model.json", {"name": name, "num_classes": num_classes,
                                              "overrides": overrides or {},
                                              "wrappers": list(wrappers), **extra})

    def model_json(self) -> dict:
        return read_json(self.path / "model.json")

    def save_weights(self, model) -> None:
        if not self.writes:
            # Reading synchronised-on-read variables (BatchNorm statistics) of a multi-worker
            # model is an all-reduce that every worker must join: save to a scratch file.
            with tempfile.TemporaryDirectory(prefix="weights-nonchief-") as scratch:
                model.save_weights(os.path.join(scratch, "weights.h5"))
            return
        with atomic_path(self.weights) as tmp:
            model.save_weights(tmp)

    def metrics(self) -> dict:
        path = self.path / "metrics.json"
        return read_json(path) if path.exists() else {}

    def write_json(self, filename: str, obj) -> None:
        """An extra JSON file of the stage (e.g. the prune stage's sparsity.json)."""
        if self.writes:
            write_json(self.path / filename, obj)

    def finish(self, metrics: dict) -> None:
        if not self.writes:
            return
        write_json(self.path / "metrics.json",
                   {**metrics, **self.provenance, "finished_at": time.time()})
        atomic_write(self.path / "DONE", time.strftime("%Y-%m-%d %H:%M:%S\n"))
