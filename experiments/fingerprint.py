"""What each stage of a workdir was made from, and whether a run may reuse it.

A stage's fingerprint is a hash of its inputs: the config keys it reads (its own section and the
top-level keys it uses: seed, precision, determinism...; `IGNORED_KEYS` left out), the student,
the data's identity, the teacher's record (models/teachers.py) and the fingerprints of the
stages it reads (`UPSTREAM`). The inputs and the hash are written to the stage's
`fingerprint.json` when it begins (after its config.json), and the hash goes into its
`metrics.json` with the code version, runtime and host (`provenance`).

The code is recorded beside the fingerprint (a digest of the sources and the git commit), not
in it: a finished stage made by other code is kept, and the run says so in one line per stage
(`--overwrite` redoes it). Refusing it would make every edit, a comment included, discard every
workdir.

`check_stages` runs before any stage: a selected stage that is finished or started under
another fingerprint is refused without `--overwrite` (one line naming what differs), and a
finished stage that is not selected but was made from a stage this run redoes is refused too
(its figures would come from the old model).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pathlib
import platform
import subprocess

REPO = pathlib.Path(__file__).resolve().parents[1]
RECORD = "fingerprint.json"
STAGES = ("teacher", "distill", "prune", "qat", "export", "benchmark", "report")

# Config keys that change no figure (checkpoint cadence, progress output, how the teacher cache
# is split into shards and batched): the only keys a finished stage may differ in and be reused.
IGNORED_KEYS = ("checkpoint_every", "eval_every", "teacher_cache.images_per_shard",
                "teacher_cache.batch_size")

# The stages each stage reads (those present in the workdir, or made by this run).
UPSTREAM = {"teacher": (), "distill": ("teacher",), "prune": ("teacher", "distill"),
            "qat": ("teacher", "distill", "prune"), "export": ("distill", "prune", "qat"),
            "benchmark": ("export",),
            "report": ("teacher", "distill", "prune", "qat", "benchmark")}

_TRAINING = ("seed", "deterministic", "jit_compile", "eval_batch_size", "data")
# Config keys each stage reads: its own section first (named without its prefix in messages).
READS = {"teacher": ("teacher", "mixed_precision", *_TRAINING),
         "distill": ("distill", "mixed_precision", *_TRAINING),
         "prune": ("prune", "distill.teacher_cache", *_TRAINING),
         "qat": ("qat", "distill.teacher_cache", *_TRAINING),
         "export": ("export", "seed", "data"),
         "benchmark": ("benchmark", "eval_batch_size", "data"),
         "report": ("preset",)}
# A structured prune to a latency budget times int8 files as the export and benchmark would.
_LATENCY_BUDGET = ("export.xnnpack_friendly", "export.float_layers", "benchmark.deny_amx")


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _plain(obj):
    """As it reads back from JSON (tuples as lists)."""
    return json.loads(json.dumps(obj, default=str))


def _tree(path) -> dict:
    """A file or folder as the number of files, their bytes and a digest of their relative
    paths, sizes and modification times (no content is read: cheap for any data set)."""
    root = pathlib.Path(path).resolve()
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    listing = [(str(p.relative_to(root)) if p != root else p.name, p.stat().st_size,
                p.stat().st_mtime_ns) for p in files]
    return {"files": len(listing), "bytes": sum(s for _, s, _ in listing),
            "digest": _digest(listing)}


def teacher_identity(record) -> dict:
    """The teacher's record (kind, architecture, weights, head, sizes: models/teachers.py), its
    weights file or folder as its files (`_tree`) when it has one."""
    ident = {k: v for k, v in record.to_json().items() if k not in ("source", "weights")}
    ident["name"] = record.source
    weights = record.weights
    if weights and os.path.exists(weights):
        ident.update(path=str(pathlib.Path(weights).resolve()), **_tree(weights))
    return ident


def data_identity(data: str, train_src=None) -> dict:
    """--data: a folder as its files (`_tree`, wherever it lies); `tfds:NAME` as its name,
    version and splits."""
    if data.startswith("tfds:"):
        ids = getattr(train_src, "ids", None) or [""]
        return {"name": data, "version": getattr(train_src, "version", None),
                "train_split": str(ids[0]).split("[")[0]}
    return _tree(data)


@functools.lru_cache(maxsize=None)
def code_digest() -> str:
    """A digest of the project's Python sources (what computes every figure)."""
    files = sorted(p for d in ("compress", "experiments", "models")
                   for p in (REPO / d).rglob("*.py"))
    h = hashlib.sha256()
    for p in files:
        h.update(str(p.relative_to(REPO)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def code_version() -> str:
    """The git commit of a checkout (`+dirty` when tracked files differ from it), else the
    version in pyproject.toml."""
    def git(*args):
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True,
                              timeout=30, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "--short=12", "HEAD")
        return commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        import tomllib

        return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    except (OSError, KeyError, ValueError):
        return "unknown"


@functools.lru_cache(maxsize=None)
def runtime_versions() -> dict:
    from importlib import metadata

    out = {}
    for key, pkg in (("tensorflow", "tensorflow"), ("litert", "ai-edge-litert")):
        try:
            out[key] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[key] = None
    return out


@functools.lru_cache(maxsize=None)
def host() -> dict:
    """CPU model and cores of this machine (what latencies depend on)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f
                        if line.lower().startswith(("model name", "hardware"))), cpu)
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": usable}


def host_label(h: dict | None = None) -> str:
    h = h or host()
    return f"{h['cpu']}, {h['cores']} cores"


def _config_keys(cfg, stage: str) -> dict:
    """The config values `stage` reads, flat (`sampler.base_size`), `IGNORED_KEYS` left out;
    keys of its own section without the section's name."""
    out = {}

    def add(prefix, value):
        if hasattr(value, "_fields"):  # a ConfigDict, in the order its keys are defined
            value = {k: value[k] for k in value._fields}
        if isinstance(value, dict):
            for k, v in value.items():
                add(f"{prefix}.{k}" if prefix else k, v)
        elif not any(prefix == k or prefix.endswith("." + k) for k in IGNORED_KEYS):
            out[prefix] = value

    keys = READS[stage]
    if stage == "prune" and cfg.prune.method == "structured" and cfg.prune.target_ms:
        keys += _LATENCY_BUDGET
    for i, key in enumerate(keys):
        value = cfg
        for part in key.split("."):
            value = value[part]
        add("" if i == 0 and key == stage else key, value)
    return _plain({_recorded_name(stage, k): v for k, v in out.items()})


def _recorded_name(stage: str, key: str) -> str:
    """A renamed key (configs.RENAMED) is hashed under its old name, so that stages finished
    before the rename keep their fingerprints; `_shown_name` is the reverse, for messages."""
    from experiments.configs import RENAMED

    old = {new: old for old, new in RENAMED.items()}
    full = f"{stage}.{key}" if f"{stage}.{key}" in old else key
    if full not in old:
        return key
    return old[full].split(".", 1)[1] if full != key else old[full]


def _shown_name(stage: str, key: str) -> str:
    from experiments.configs import RENAMED

    full = f"{stage}.{key}" if f"{stage}.{key}" in RENAMED else key
    if full not in RENAMED:
        return key
    return RENAMED[full].split(".", 1)[1] if full != key else RENAMED[full]


def components(run, stage: str, planned: dict) -> dict:
    """The inputs of `stage` in this run; `planned`: the fingerprints its upstream stages have
    (or will have once this run has made them)."""
    c = {"config": _config_keys(run.cfg, stage)}
    if stage != "teacher":
        c["student"] = run.student
    if stage in ("distill", "prune", "qat", "export", "benchmark"):
        c["export_size"] = run.export_size  # the size every student is evaluated and exported at
    if stage in ("teacher", "distill", "prune", "qat"):
        c["teacher"] = _once(run, "_teacher_identity",
                             lambda: teacher_identity(run.teacher_record))
    if stage != "report":
        c["data"] = _once(run, "_data_identity", lambda: data_identity(run.data, run.train_src))
    if stage == "benchmark":
        c["host"] = {k: host()[k] for k in ("cpu", "cores")}
    c["upstream"] = {u: planned[u] for u in UPSTREAM[stage] if u in planned}
    return _plain(c)


def _once(run, attr, compute):
    """`compute()` once per run (listing a large data folder takes a moment)."""
    if getattr(run, attr, None) is None:
        setattr(run, attr, compute())
    return getattr(run, attr)


def make_record(run, stage: str, planned: dict) -> dict:
    comp = components(run, stage, planned)
    return {"stage": stage, "fingerprint": _digest(comp), "components": comp,
            "code_version": code_version(), "code_digest": code_digest()}


def read_record(path) -> dict | None:
    p = pathlib.Path(path) / RECORD
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def _short(value) -> str:
    if isinstance(value, dict):
        if "cpu" in value:
            return host_label(value)
        if "path" in value:
            return str(value["path"])
        if "name" in value:
            return " ".join(str(value[k]) for k in ("name", "version") if value.get(k))
        return f"{value.get('files')} files"
    return json.dumps(value) if isinstance(value, (list, bool)) or value is None else str(value)


def _files_change(a: dict, b: dict) -> str:
    """Two listings of one folder or file (`_tree`) that differ."""
    if a.get("files") != b.get("files"):
        return f"{a.get('files')} files -> {b.get('files')} files"
    if a.get("bytes") != b.get("bytes"):
        return f"{a.get('bytes'):,} bytes -> {b.get('bytes'):,} bytes in {b.get('files')} files"
    return f"{b.get('files')} files with other names or modification times"


def differences(old: dict, new: dict) -> dict[str, list[str]]:
    """{what: [detail, ...]} between two records' components, e.g.
    {"config": ["steps 6 -> 12", "lr 0.002 -> 0.01"]}."""
    a, b = old.get("components", {}), new.get("components", {})
    out: dict[str, list[str]] = {}
    ca, cb = a.get("config", {}), b.get("config", {})
    for k in [*cb, *(k for k in ca if k not in cb)]:
        if ca.get(k, "(unset)") != cb.get(k, "(unset)"):
            out.setdefault("config", []).append(
                f"{_shown_name(new.get('stage', ''), k)} {_short(ca.get(k, '(unset)'))} -> "
                f"{_short(cb.get(k, '(unset)'))}")
    for what in ("student", "export_size", "teacher", "data", "host"):
        if a.get(what) != b.get(what):
            x, y = a.get(what), b.get(what)
            if all(isinstance(v, dict) and "files" in v for v in (x, y)) \
                    and x.get("path") == y.get("path"):  # the same folder or file, changed
                out[what] = [_files_change(x, y)]
            else:
                out[what] = [f"{_short(x)} -> {_short(y)}"]
    ua, ub = a.get("upstream", {}), b.get("upstream", {})
    for u in UPSTREAM.get(new.get("stage"), ()):
        if ua.get(u) != ub.get(u):
            state = "that is missing" if u not in ub else "that was redone"
            out.setdefault("inputs", []).append(f"made from a {u} stage {state}")
    return out


def refusal(stage: str, diff: dict, started: bool) -> str:
    what = list(diff)
    verb = "differs" if len(what) == 1 else "differ"
    where = "the started stage" if started else "the finished stage"
    details = "; ".join(", ".join(v) for v in diff.values())
    return (f"{stage}: {' and '.join(what)} {verb} from {where}: {details}; rerun with "
            "--overwrite or use another --workdir")


def check_stages(run, selected, *, overwrite: bool) -> str | None:
    """Plan every stage's fingerprint before any work (`run.plan`: stage -> record) and return
    the one-line refusal of the first stage that cannot be reused or kept, or None.

    A selected stage: finished or started under another fingerprint and no --overwrite:
    refused. A stage that is not selected but finished: kept when the stages it was made from
    are unchanged, else refused (it must be redone with them)."""
    from experiments.workdir import StageDir

    planned, run.plan = {}, {}
    for stage in STAGES:
        sdir = StageDir(run.workdir, stage)
        old = read_record(sdir.path)
        if stage in selected:
            new = make_record(run, stage, planned)
            run.plan[stage] = new
            planned[stage] = new["fingerprint"]
            if overwrite or not sdir.path.exists():
                continue
            if old is None:
                if sdir.done:
                    return (f"{stage}: finished without a fingerprint (by an older version of "
                            "the pipeline); rerun with --overwrite or use another --workdir")
                continue  # nothing was started under a fingerprint: started afresh
            if old.get("fingerprint") != new["fingerprint"]:
                diff = differences(old, new) or {"inputs": ["other inputs"]}
                return refusal(stage, diff, started=not sdir.done)
            _note_code(stage, old, new)
        elif sdir.done:
            if old is None:
                return (f"{stage}: finished without a fingerprint (by an older version of the "
                        f"pipeline); add {stage} to --stages with --overwrite, or use another "
                        "--workdir")
            for u, fp in old["components"].get("upstream", {}).items():
                if planned.get(u) != fp:
                    state = "was redone" if u in selected else "is missing or changed"
                    return f"{stage}: made from a {u} stage that {state}; add {stage} to --stages"
            planned[stage] = old["fingerprint"]
    return None


def _note_code(stage: str, old: dict, new: dict) -> None:
    """One line when a stage that is reused was made by other sources."""
    if old.get("code_digest") and old.get("code_digest") != new.get("code_digest"):
        print(f"[{stage}] made by other code ({old.get('code_version')}, now "
              f"{new.get('code_version')}): its files and figures are kept; --overwrite "
              "redoes it", flush=True)


def prepare(run, stage) -> None:
    """Give `stage` (a StageDir) its record (planned by `check_stages`, else made now), which
    its `begin` writes as fingerprint.json, and the provenance its metrics.json carries."""
    plan = getattr(run, "plan", None)
    if plan is None or stage.name not in plan:
        planned = {}
        for s in STAGES[:STAGES.index(stage.name)]:
            rec = read_record(run.workdir / s)
            if rec and (run.workdir / s / "DONE").exists():
                planned[s] = rec["fingerprint"]
        run.plan = plan = plan or {}
        plan[stage.name] = make_record(run, stage.name, planned)
    stage.record = plan[stage.name]
    threads = None
    if stage.name == "benchmark":
        threads = [t or os.cpu_count() for t in run.cfg.benchmark.threads]
    stage.provenance = provenance(stage.record["fingerprint"], threads)


def provenance(fingerprint: str, threads=None) -> dict:
    """The figures' provenance: stage fingerprint, code version, runtime and host."""
    h = dict(host())
    h["threads"] = threads if threads is not None else _threads()
    return {"fingerprint": fingerprint, "code_version": code_version(),
            "runtime": runtime_versions(), "host": h}


def _threads():
    try:
        import tensorflow as tf

        return tf.config.threading.get_intra_op_parallelism_threads() or host()["usable_cores"]
    except Exception:  # noqa: BLE001 - a provenance detail, never a failure
        return host()["usable_cores"]


def stage_fingerprint(workdir, stage: str) -> str | None:
    rec = read_record(pathlib.Path(workdir) / stage)
    return rec.get("fingerprint") if rec else None


def row_columns(workdir, stage: str, benchmark_fingerprint: str) -> dict:
    """The provenance columns of a results.csv row of `stage`'s file (compress.results.table
    `PROVENANCE_COLUMNS`)."""
    v = runtime_versions()
    return {"stage_fingerprint": stage_fingerprint(workdir, stage),
            "benchmark_fingerprint": benchmark_fingerprint, "code_version": code_version(),
            "tensorflow_version": v["tensorflow"], "litert_version": v["litert"],
            "host": host_label()}


def report_lines(workdir) -> list[str]:
    """The report's provenance header: code, runtime, host and every stage's fingerprint."""
    v = runtime_versions()
    h = host()
    fps = ", ".join(f"{s} `{fp}`" for s in STAGES if (fp := stage_fingerprint(workdir, s)))
    try:
        threads = json.loads((pathlib.Path(workdir) / "benchmark" / "metrics.json").read_text())
        threads = ", ".join(map(str, threads["host"]["threads"]))
    except (OSError, ValueError, KeyError, TypeError):
        threads = "unknown"
    return [f"Made by code {code_version()} with TensorFlow {v['tensorflow']} and LiteRT "
            f"{v['litert']} on {h['cpu']} ({h['cores']} cores, {h['usable_cores']} usable; "
            f"benchmark threads {threads}). Stage fingerprints: {fps}."]
