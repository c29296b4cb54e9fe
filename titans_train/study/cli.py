"""`titans-train study plan|run|collect|fit|plot`: recipe-driven scaling studies.

  plan STUDY              every run with its parameters, tokens and FLOPs (all validated)
  run STUDY               train the unfinished runs here, one after another (resumable), or
                          `--slurm SWEEP.yaml`: write them as a sweep file of override sets
  collect STUDY           one table (CSV, or JSONL by extension) of every run and its status
  fit TABLE               L(N, D) = E + A N^-alpha + B D^-beta per variant, bootstrap intervals
  plot TABLE              loss curves, IsoFLOP profiles and the fitted frontier (PNG + SVG)

Exit codes: 0 done, 1 a run failed or is unfinished, 2 a study/table error (nothing started),
75 stopped by a signal (run again to resume).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from titans_train.config import ConfigError, InvalidValueError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    runs_dir = {"help": "where the runs are (default: the study's runs_dir, runs/studies/<name>)"}
    plan = sub.add_parser("plan", help="list every run with parameters, tokens and FLOPs")
    plan.add_argument("study", help="a study YAML file, or a name under recipes/ (studies/tiny-cpu)")
    plan.add_argument("--runs-dir", **runs_dir)
    plan.add_argument("--json", action="store_true", help="one JSON object per run, one per line")
    run = sub.add_parser("run", help="train the study's runs one after another (resumable)")
    run.add_argument("study")
    run.add_argument("--runs-dir", **runs_dir)
    run.add_argument("--retry-failed", action="store_true", help="run failed and diverged runs again")
    run.add_argument("--slurm", metavar="SWEEP", type=Path,
                     help="do not train here: write the unfinished runs as a sweep file for `titans-train slurm submit`")
    run.add_argument("--submit", nargs=argparse.REMAINDER, metavar="SLURM_OPTION",
                     help="with --slurm, last: submit that sweep as one array job; everything after it goes to "
                          "`titans-train slurm submit` (e.g. --submit --nodes 1 --gpus-per-node 8 --partition gpu)")
    collect = sub.add_parser("collect", help="one table of every run: parameters, tokens, FLOPs, loss, status")
    collect.add_argument("study")
    collect.add_argument("--runs-dir", **runs_dir)
    collect.add_argument("--out", type=Path, help="CSV, or JSONL if it ends in .jsonl (default <runs_dir>/results.csv)")
    fit = sub.add_parser("fit", help="fit L(N, D) = E + A N^-alpha + B D^-beta per variant")
    _table_arguments(fit)
    fit.add_argument("--json", action="store_true", help="print the fit as one JSON object")
    fit.add_argument("--out", type=Path, help="also write the JSON to this file")
    plot = sub.add_parser("plot", help="loss curves, IsoFLOP profiles, fitted frontier (PNG and SVG)")
    _table_arguments(plot)
    plot.add_argument("--out-dir", type=Path, help="default: the table's folder")


def _table_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("table", type=Path, help="a `study collect` table, or any CSV/JSONL with parameter, token and loss columns")
    parser.add_argument("--n-column", help="parameter column (default: params, parameters, N or n_params)")
    parser.add_argument("--d-column", help="token column (default: tokens, D or n_tokens)")
    parser.add_argument("--loss-column", help="loss column (default: val_loss, loss, L or final_val_loss)")
    parser.add_argument("--compute", choices=("6ND", "flops"), default="6ND",
                        help="C = 6 N D, or C = k N D with k the median of the table's flops / (N D) (default 6ND)")
    parser.add_argument("--bootstrap", type=int, default=200,
                        help="bootstrap refits for the intervals (default 200; plot draws point estimates only)")
    parser.add_argument("--seed", type=int, default=0)


def _plan(args):
    from titans_train.study.plan import plan_study
    from titans_train.study.spec import load_study

    study, path = load_study(args.study)
    return study, plan_study(study, path, runs_dir=args.runs_dir)


def _print_plan(runs) -> None:
    from titans_train.study.collect import run_status

    print(f"{'run':<28} {'params':>10} {'non-emb':>10} {'steps':>6} {'tokens':>11} {'FLOPs/token':>12} {'FLOPs':>10}  status")
    for run in runs:
        print(f"{run.name:<28} {run.params:>10,} {run.non_embedding_params:>10,} {run.steps:>6} {run.tokens:>11,} "
              f"{run.flops_per_token:>12.4g} {run.flops:>10.3g}  {run_status(run)}")
    print(f"{len(runs)} runs, {sum(r.flops for r in runs):.3g} FLOPs in all (our count: matmuls, memory updates "
          f"included), {sum(r.tokens for r in runs):,} tokens")


def _read_table(args):
    from titans_train.study.collect import read_table

    if not args.table.is_file():
        raise ConfigError("table", f"no file {args.table}; make one with `titans-train study collect STUDY`")
    return read_table(args.table)


def _fit(args, rows, resamples: int):
    from titans_train.study.fit import fit_table

    return fit_table(rows, args.n_column, args.d_column, args.loss_column, resamples=resamples,
                     compute=args.compute, seed=args.seed, key=str(args.table))


def run(args: argparse.Namespace) -> int:
    return _run(args)  # a ConfigError is printed by the CLI on one line, exit 2


def _run(args: argparse.Namespace) -> int:
    if args.action in ("plan", "run", "collect"):
        study, runs = _plan(args)
    if args.action == "plan":
        if args.json:
            print("\n".join(json.dumps(run.record()) for run in runs))
        else:
            _print_plan(runs)
        return 0
    if args.action == "run":
        from titans_train.study.runner import run_study, write_sweep

        if args.submit is not None and not args.slurm:
            raise InvalidValueError("--submit", "goes with --slurm SWEEP (the sweep file to write and submit)")
        if args.slurm:
            todo = write_sweep(study.name, runs, args.slurm)
            print(f"{args.slurm}: {len(todo)} of {len(runs)} runs (the unfinished ones)")
            if args.submit is None:
                print(f"submit with `titans-train study run {args.study} --slurm {args.slurm} --submit --nodes N "
                      "--gpus-per-node G` or `titans-train slurm submit` (see docs/scaling-study.md)")
                return 0
            if not todo:
                return 0
            from titans_train.cli import main as cli_main

            # The array job's own files (script, logs) go beside the runs; each task trains in its
            # run's directory, named in the sweep file.
            job_dir = Path(todo[0].run_dir).parent / "slurm-sweep"
            return cli_main(["slurm", "submit", todo[0].recipe, f"run_dir={job_dir}", "--sweep", str(args.slurm),
                             *args.submit])
        return run_study(runs, retry_failed=args.retry_failed)
    if args.action == "collect":
        from titans_train.study.collect import collect, write_table

        rows = collect(runs)
        out = args.out or Path(args.runs_dir or study.runs_dir) / "results.csv"
        write_table(rows, out)
        counts = {}
        for row in rows:
            counts[row["status"]] = counts.get(row["status"], 0) + 1
        for row in rows:
            if row["status"] != "finished":
                print(f"{row['run']}: {row['status']} (step {row['last_step']}/{row['steps']}, exit code "
                      f"{row['exit_code']}; {row['run_dir']})")
        print(f"{out}: {len(rows)} runs ({', '.join(f'{n} {s}' for s, n in counts.items())})")
        return 0 if counts.get("finished", 0) == len(rows) else 1
    rows = _read_table(args)
    if args.action == "fit":
        from titans_train.study.fit import format_fit

        result = _fit(args, rows, args.bootstrap)
        if args.out:
            from titans_train.study.collect import write_atomic

            write_atomic(args.out, json.dumps(result, indent=1))
        print(json.dumps(result) if args.json else format_fit(result))
        return 0
    from titans_train.study.plot import write_figures

    try:
        result = _fit(args, rows, resamples=0)  # the figures draw the point estimates only
    except ConfigError as error:  # the curves and profiles do not need a fit
        print(f"no fitted frontier: {error}", file=sys.stderr)
        result = None
    for path in write_figures(rows, args.out_dir or args.table.parent, result):
        print(path)
    return 0
