"""Functions that tests/compress/test_io_child.py runs in child processes (`compress.child`)."""

import os
import sys
import time


def echo(**kwargs):
    return {"got": kwargs, "pid": os.getpid()}


def fail():
    raise ValueError("no such thing")


def abort():
    os.abort()


def sleep(seconds):
    time.sleep(seconds)
    return {}


def heavy_modules_after(module):
    """Which heavy frameworks importing `module` loads (the timed children must load none)."""
    __import__(module)
    return {"loaded": sorted(m for m in ("tensorflow", "tf_keras", "torch") if m in sys.modules)}
