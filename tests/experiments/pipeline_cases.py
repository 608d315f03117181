"""Runs many `python -m experiments.pipeline` command lines cheaply (not a test module).

    python -m tests.experiments.pipeline_cases CASES.json RESULTS.json   (from the repository root)

CASES.json: a list of {"argv": [...], "offline": bool, "disk_full": bool}. The heavy imports
(TensorFlow, the registry, the stages) are done once here; each case then runs in a forked
child as `python -m experiments.pipeline ARGV` would (the pipeline module itself is executed
afresh in the child, so its flags are defined from the child's argv). Each result holds the
exit status and the child's stdout and stderr. `offline` makes every network connection fail;
`disk_full` makes every `Path.write_text` and `shutil.copyfile` fail with ENOSPC.
"""

import errno
import json
import os
import pathlib
import runpy
import shutil
import socket
import sys
import tempfile
import time
import traceback

# TensorFlow and everything the pipeline imports, once for every case
import compress.measure.costs  # noqa: F401
import compress.prune  # noqa: F401
import compress.tflite.audit  # noqa: F401
import compress.tflite.convert  # noqa: F401
import compress.training  # noqa: F401
import experiments.benchmark  # noqa: F401
import experiments.data  # noqa: F401
import experiments.stages  # noqa: F401
import models  # noqa: F401
import models.vit_checkpoints  # noqa: F401
import tensorflow_datasets  # noqa: F401


def _simulate(case):
    if case.get("offline"):
        def unreachable(*args, **kwargs):
            raise OSError(errno.ENETUNREACH, "Network is unreachable")

        socket.create_connection = unreachable
    if case.get("disk_full"):
        def full(self, *args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device", str(self))

        def full_copy(src, dst, *args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))

        def full_fsync(fd):  # compress.io.atomic_write flushes every artifact to disk
            raise OSError(errno.ENOSPC, "No space left on device")

        pathlib.Path.write_text = full
        os.fsync = full_fsync
        shutil.copyfile = full_copy


def run_case(case, out_dir, i):
    out, err = out_dir / f"{i}.out", out_dir / f"{i}.err"
    pid = os.fork()
    if pid == 0:  # the child: stdout/stderr to files, then the pipeline as __main__
        code = 1
        try:
            for fd, path in ((1, out), (2, err)):
                f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                os.dup2(f, fd)
            sys.argv = ["experiments/pipeline.py", *case["argv"]]
            _simulate(case)
            runpy.run_module("experiments.pipeline", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as e:  # what the interpreter does with sys.exit(...)
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
                code = 1
            else:
                code = e.code or 0
        except BaseException:  # noqa: BLE001
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    start = time.perf_counter()
    _, status = os.waitpid(pid, 0)
    return {"argv": case["argv"], "code": os.waitstatus_to_exitcode(status),
            "seconds": time.perf_counter() - start,
            "stdout": out.read_text(errors="replace"), "stderr": err.read_text(errors="replace")}


def main(cases_path, results_path):
    cases = json.loads(pathlib.Path(cases_path).read_text())
    out_dir = pathlib.Path(tempfile.mkdtemp(prefix="pipeline_cases"))
    results = [run_case(case, out_dir, i) for i, case in enumerate(cases)]
    pathlib.Path(results_path).write_text(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
