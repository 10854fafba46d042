"""Compare runs: python -m trainer.summarize DIR... [--csv FILE]

Prints one table with a row per run found under the given folders (every results.json below them): method,
dataset, backbone, seeds, last and average incremental accuracy (mean ± sample std over seeds), forgetting and the
final inference GFLOPs.
"""
from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import sys

from trainer.metrics import format_mean_std

COLUMNS = ("method", "dataset", "backbone", "seeds", "last_acc", "avg_incremental_acc", "forgetting", "gflops",
           "run")


def collect(folders: list[str]) -> list[dict]:
    rows = []
    for folder in folders:
        for path in sorted(glob.glob(os.path.join(folder, "**", "results.json"), recursive=True)):
            with open(path) as f:
                results = json.load(f)
            summary, cfg = results.get("summary") or {}, results["config"]
            if "last_acc" not in summary:
                continue  # an unfinished run
            rows.append({"method": cfg["method"], "dataset": cfg["dataset"], "backbone": cfg["backbone"],
                         "seeds": " ".join(str(r["seed"]) for r in results["runs"]),
                         "last_acc": _pm(summary["last_acc"]), "avg_incremental_acc": _pm(summary["avg_incremental_acc"]),
                         "forgetting": _pm(summary["forgetting"]), "gflops": f"{summary['final_gflops']['mean']:.4f}",
                         "run": os.path.dirname(path)})
    return rows


def _pm(stat: dict) -> str:
    return format_mean_std(stat)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", help="folders searched for results.json")
    parser.add_argument("--csv", help="also write the table to this CSV file")
    args = parser.parse_args(argv)
    rows = collect(args.folders)
    if not rows:
        sys.stderr.write(f"error: no finished run (results.json with a summary) under {', '.join(args.folders)}\n")
        raise SystemExit(2)
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in COLUMNS}
    lines = ["  ".join(c.ljust(widths[c]) for c in COLUMNS)]
    lines += ["  ".join(str(r[c]).ljust(widths[c]) for c in COLUMNS) for r in rows]
    sys.stdout.write("\n".join(lines) + "\n")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
    return rows


if __name__ == "__main__":
    main()
