"""Compare runs: python -m trainer.summarize DIR... [--csv FILE]

Prints one table with a row per run found under the given folders (every results.json below them): method,
dataset, backbone, seeds, last and average incremental accuracy (mean ± sample std over seeds), forgetting and the
final inference GFLOPs. A results.json that cannot be used (corrupt, nested too deeply, of another shape) is left
out with a warning naming it; exit status 2 with one line when no run is left to table or the CSV cannot be
written.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys

from trainer.metrics import format_mean_std

COLUMNS = ("method", "dataset", "backbone", "seeds", "last_acc", "avg_incremental_acc", "forgetting", "gflops",
           "run")


#: results.json as a run writes it is a few MB at most; a larger file is not one.
MAX_BYTES = 64 * 2**20


def collect(folders: list[str], problems: list[str] | None = None) -> list[dict]:
    """A row per finished run under `folders`. A results.json that cannot be read (not JSON, nested too deep,
    too large, not of the shape a run writes) is left out and named, with why, in `problems`."""
    rows = []
    for path in _results_files(folders):
        try:
            row = _row(path)
        except _Unusable as err:
            if problems is not None:
                problems.append(f"'{path}' {err}")
            continue
        if row is not None:
            rows.append(row)
    return rows


def _results_files(folders: list[str]) -> list[str]:
    """Every results.json below `folders`, sorted. Linked folders are followed, each folder once: two links back
    to their own folder would make a plain recursive glob visit 2**depth paths."""
    found, seen = [], set()
    for folder in folders:
        for root, dirs, files in os.walk(folder, followlinks=True):
            try:
                st = os.stat(root)
            except OSError:
                dirs[:] = []
                continue
            if (st.st_dev, st.st_ino) in seen:
                dirs[:] = []
                continue
            seen.add((st.st_dev, st.st_ino))
            if "results.json" in files:
                found.append(os.path.join(root, "results.json"))
    return sorted(found)


class _Unusable(Exception):
    """Why a results.json cannot be tabled (completes "'<path>' ...")."""


def _row(path: str) -> dict | None:
    """The table row of the run whose results.json is at `path` (None for an unfinished run)."""
    try:
        with open(path, encoding="utf-8") as f:
            if os.fstat(f.fileno()).st_size > MAX_BYTES:
                raise _Unusable(f"is larger than {MAX_BYTES // 2**20} MiB")
            results = json.load(f)
    except (ValueError, UnicodeDecodeError):  # JSONDecodeError, or an integer of more than 4300 digits
        raise _Unusable("is not JSON") from None
    except RecursionError:
        raise _Unusable("is nested too deeply") from None
    except OSError as err:
        raise _Unusable(f"cannot be read: {err.strerror or err}") from None
    try:
        summary, cfg = results.get("summary") or {}, results["config"]
        if "last_acc" not in summary:
            return None  # an unfinished run
        names = [cfg[k] for k in ("method", "dataset", "backbone")]
        if not all(isinstance(n, str) and n.isprintable() and len(n) <= 200 for n in names):
            raise TypeError
        return {"method": names[0], "dataset": names[1], "backbone": names[2],
                "seeds": " ".join(str(int(r["seed"])) for r in results["runs"]),
                "last_acc": _pm(summary["last_acc"]), "avg_incremental_acc": _pm(summary["avg_incremental_acc"]),
                "forgetting": _pm(summary["forgetting"]), "gflops": f"{float(summary['final_gflops']['mean']):.4f}",
                "run": os.path.dirname(path)}
    except (KeyError, TypeError, ValueError, AttributeError, IndexError):
        raise _Unusable("is not the results of a run (a key is missing or of the wrong type)") from None


def _pm(stat: dict) -> str:
    return format_mean_std(stat)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", help="folders searched for results.json")
    parser.add_argument("--csv", help="also write the table to this CSV file")
    args = parser.parse_args(argv)
    if args.csv and os.path.isdir(args.csv):
        _fail(f"--csv '{args.csv}' is a folder; give the CSV file to write, e.g. {os.path.join(args.csv, 'runs.csv')}")
    problems: list[str] = []
    rows = collect(args.folders, problems)
    if not rows:
        _fail(f"no finished run (results.json with a summary) under {', '.join(args.folders)}"
              + (f"; {len(problems)} results.json cannot be used, e.g. {problems[0]}" if problems else ""))
    for problem in problems:
        sys.stderr.write(f"warning: left out {problem}\n")
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in COLUMNS}
    lines = ["  ".join(c.ljust(widths[c]) for c in COLUMNS)]
    lines += ["  ".join(str(r[c]).ljust(widths[c]) for c in COLUMNS) for r in rows]
    sys.stdout.write("\n".join(lines) + "\n")
    if args.csv:
        try:
            with open(args.csv, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=COLUMNS)
                writer.writeheader()
                writer.writerows(rows)
        except OSError as err:
            _fail(f"--csv '{args.csv}' cannot be written: {err.strerror or err}")
    return rows


def _fail(message: str) -> None:
    """One line on stderr, exit status 2 (as main.py's errors)."""
    sys.stderr.write(f"error: {message}\n")
    raise SystemExit(2)


if __name__ == "__main__":
    main()
