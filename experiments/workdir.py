"""The workdir layout of ../shared/CONTRACT.md and the files every stage writes.

    DIR/<stage>/config.json   resolved configuration of the stage
    DIR/<stage>/model.json    registry name, overrides and wrappers needed to rebuild the model
    DIR/<stage>/weights.h5    weights the next stage reloads
    DIR/<stage>/metrics.json  final figures of the stage
    DIR/<stage>/ckpt/         training checkpoints for resuming
    DIR/<stage>/DONE          written last; a stage with DONE is skipped unless --overwrite

Every file is written atomically (temporary file, then rename), so a kill never leaves a
half-written artifact that a later run would trust.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile
import time

import numpy as np


def atomic_write_text(path, text: str) -> None:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, pathlib.Path):
        return str(obj)
    return obj


def write_json(path, obj) -> None:
    atomic_write_text(path, json.dumps(_jsonable(obj), indent=2, sort_keys=True) + "\n")


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

    @property
    def done(self) -> bool:
        return (self.path / "DONE").exists()

    def child(self, name: str) -> "StageDir":
        """A stage folder inside this one (the distill stage's labels-only baseline)."""
        return StageDir(self.path, name, writes=self.writes)

    def reset(self) -> None:
        """--overwrite: forget everything this stage computed."""
        if self.writes and self.path.exists():
            shutil.rmtree(self.path)

    def begin(self, config: dict) -> None:
        if not self.writes:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        write_json(self.path / "config.json", config)

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
        tmp = self.path / f".weights.tmp{os.getpid()}.h5"
        model.save_weights(str(tmp))
        os.replace(tmp, self.weights)

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
        write_json(self.path / "metrics.json", {**metrics, "finished_at": time.time()})
        atomic_write_text(self.path / "DONE", time.strftime("%Y-%m-%d %H:%M:%S\n"))
