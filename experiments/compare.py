"""Compare the TFLite files of several pipeline workdirs in one report and one HParams view.

    python -m experiments.compare --workdirs=runs/a,runs/b --out=runs/compare

Reads `<workdir>/results.csv` of each workdir, adds a `workdir` column, and writes to `--out`:
`results.csv` (all rows, keyed by workdir, path, threads and delegate), `report.md` with the
three plots of `compress.results.report.write_report`, and TensorBoard HParams under `<out>/tb/hparams`
(one trial per row; `tensorboard --logdir <out>/tb/hparams`). Latencies measured on different
machines are not comparable: the report lists each workdir's machine.json, names the hosts in
its title when there are several, and gives no speed-up between rows of different hosts.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

from absl import app, flags

_WORKDIRS = flags.DEFINE_list("workdirs", None, "Comma-separated pipeline workdirs to compare.")
_OUT = flags.DEFINE_string("out", None, "Folder for the merged results.csv, report.md and plots.")
_TITLE = flags.DEFINE_string("title", None, "Heading of the report.")


def load_workdirs(workdirs: Sequence[str]) -> tuple[list[dict], list[dict]]:
    """Rows of every workdir's results.csv with a `workdir` column, and their machine.json files.

    Raises:
      ValueError naming `--workdirs` for an empty list, a missing folder or a missing results.csv.
    """
    from compress.results.table import read_results

    workdirs = [w for w in (workdirs or []) if w.strip()]
    if not workdirs:
        raise ValueError("--workdirs: give at least one workdir (comma-separated)")
    for w in workdirs:
        if not os.path.isdir(w):
            raise ValueError(f"--workdirs: workdir {w!r} does not exist")
        if not os.path.isfile(os.path.join(w, "results.csv")):
            raise ValueError(
                f"--workdirs: {w!r} has no results.csv (run its benchmark stage first)"
            )
    rows, machines = [], []
    for w in workdirs:
        for r in read_results(w):
            rows.append({"workdir": w, **r})
        mpath = os.path.join(w, "machine.json")
        if os.path.exists(mpath):
            with open(mpath) as f:
                machines.append({**json.load(f), "workdir": w})
    return rows, machines


def compare(workdirs: Sequence[str], out: str, *, title: str | None = None) -> dict:
    """Merge the workdirs' results into `out`; returns the paths written."""
    from compress.results.hparams import write_hparams
    from compress.results.report import write_report
    from compress.results.table import KEY, write_results

    if not out:
        raise ValueError("--out: give the folder for the comparison")
    rows, machines = load_workdirs(workdirs)
    os.makedirs(out, exist_ok=True)
    csv_path = write_results(out, rows, key=("workdir", *KEY), merge=False)
    if machines:
        with open(os.path.join(out, "machines.json"), "w") as f:
            json.dump(machines, f, indent=2)
    for m in machines:
        m["cpu"] = f"{m.get('cpu')} [{m['workdir']}]"
    from compress.results.report import host_of

    hosts = sorted({host_of(r) for r in rows})
    if len(hosts) > 1 and not title:
        title = "Comparison of " + ", ".join(workdirs)
    if len(hosts) > 1:  # speed-ups are only between rows of one host (report.glance_lines)
        title += (f" (measured on {len(hosts)} hosts: {'; '.join(hosts)}; latencies of different "
                  "hosts are not compared)")
    report = write_report(
        out,
        rows=rows,
        out_dir=out,
        machine=machines or None,
        title=title or "Comparison of " + ", ".join(workdirs),
    )
    logdir = write_hparams(os.path.join(out, "tb", "hparams"), rows)
    return {"results": csv_path, "report": report, "hparams": logdir}


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        paths = compare(_WORKDIRS.value, _OUT.value, title=_TITLE.value)
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    for k, v in paths.items():
        print(f"{k}: {v}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["workdirs", "out"])
    app.run(main)
