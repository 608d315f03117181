"""The runtime needs requirements.txt alone: every module of the pipeline's packages imports
with torch, torchvision, timm and transformers made unimportable (a stray import of one of them
in runtime code fails here; they are test-only requirements)."""

import subprocess
import sys

from tests.helpers import REPO

TEST_ONLY = ("torch", "torchvision", "timm", "transformers", "keras_cv_attention_models")
PACKAGES = ("compress", "models", "experiments")

_IMPORT_ALL = f"""
import importlib, pkgutil, sys
for name in {TEST_ONLY!r}:
    sys.modules[name] = None  # `import name` now raises ImportError
modules = ["experiments.pipeline"]
for package in {PACKAGES!r}:
    modules.append(package)
    path = importlib.import_module(package).__path__
    modules += [m.name for m in pkgutil.walk_packages(path, package + ".")]
for name in modules:
    importlib.import_module(name)
print(len(modules), "modules")
"""


def test_runtime_modules_import_without_the_test_only_packages():
    proc = subprocess.run([sys.executable, "-c", _IMPORT_ALL], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert int(proc.stdout.split()[-2]) > 20, proc.stdout
