"""
Where the time of a Dagster run went: per step, the step's wall time and the time its nanochat child process
ran (the asset's `wall_time_s`), and the difference, which is what orchestration costs (process start-up,
artifact transfers, hashing, DuckDB writes, Dagster's own bookkeeping).

    DAGSTER_HOME=... python -m orchestration.run_summary            # the latest run
    DAGSTER_HOME=... python -m orchestration.run_summary RUN_ID
    DAGSTER_HOME=... python -m orchestration.run_summary --json     # one JSON line, like nanochat.bench's figures
"""

from __future__ import annotations

import argparse
import json
import sys

import dagster as dg
import torch

from nanochat.bench import machine_info


def summarize(instance: dg.DagsterInstance, run_id: str | None = None) -> dict:
    if run_id is None:
        runs = instance.get_runs(limit=1)
        if not runs:
            raise SystemExit(f"no runs in the Dagster instance at {instance.root_directory}")
        run_id = runs[0].run_id
    run_stats = instance.get_run_stats(run_id)
    steps = []
    for stat in sorted(instance.get_run_step_stats(run_id), key=lambda s: s.start_time or 0):
        if stat.start_time is None or stat.end_time is None:
            continue
        child = 0.0
        for event in stat.materialization_events:  # AssetMaterialization (or its event log entry)
            materialization = getattr(event, "asset_materialization", None) or event
            wall = (materialization.metadata or {}).get("wall_time_s")
            child += float(wall.value) if wall is not None else 0.0
        steps.append({"step": stat.step_key, "status": stat.status.value if stat.status else "?",
                      "step_s": stat.end_time - stat.start_time, "child_s": child})
    total = (run_stats.end_time or 0) - (run_stats.launch_time or run_stats.start_time or 0)
    child_total = sum(s["child_s"] for s in steps)
    return {"run_id": run_id, "steps": steps, "run_s": total, "child_s": child_total, "overhead_s": total - child_total}


def orchestration_figure(instance: dg.DagsterInstance, run_id: str | None = None) -> dict:
    """The benchmark line: run wall time = training/eval processes + orchestration, with the machine."""
    s = summarize(instance, run_id)
    return {"bench": "orchestration", **machine_info(torch.device("cpu")), "run_id": s["run_id"],
            "run_s": round(s["run_s"], 1), "training_eval_s": round(s["child_s"], 1),
            "orchestration_s": round(s["overhead_s"], 1),
            "orchestration_share": round(s["overhead_s"] / s["run_s"], 4) if s["run_s"] else None,
            "steps": len(s["steps"])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("run_id", nargs="?", default=None)
    p.add_argument("--json", action="store_true", help="print the benchmark figure as one JSON line")
    args = p.parse_args(argv)
    if args.json:
        print(json.dumps(orchestration_figure(dg.DagsterInstance.get(), args.run_id)), flush=True)
        return 0
    s = summarize(dg.DagsterInstance.get(), args.run_id)
    print(f"run {s['run_id']}")
    print(f"{'step':<40} {'status':<10} {'step s':>8} {'training/eval s':>16}")
    for step in s["steps"]:
        print(f"{step['step']:<40} {step['status']:<10} {step['step_s']:>8.1f} {step['child_s']:>16.1f}")
    share = 100 * s["overhead_s"] / s["run_s"] if s["run_s"] else 0.0
    print(f"run wall time {s['run_s']:.1f}s = training/eval processes {s['child_s']:.1f}s "
          f"+ orchestration {s['overhead_s']:.1f}s ({share:.1f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
