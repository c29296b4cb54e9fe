"""`titans-train slurm submit|status|cancel`: SLURM jobs of a recipe, by run directory.

submit: validates the recipe for the job's world size (nodes x gpus-per-node; tp x sp must divide
it), renders the batch script into `<run_dir>/slurm/`, and calls sbatch (`--dry-run`: prints the
script, submits nothing). With `--sweep FILE` (one override set per line) it submits one array job
`--array=0-(n-1)%k`, task i training into `<run_dir>/<i:03d>`. Job ids are appended to
`<run_dir>/slurm/jobs`, which is how status and cancel find them.
Exit codes: 0 submitted, 2 a user error (`SlurmError`/`ConfigError`, printed on one line by the
CLI, naming the option and the fix).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from titans_train.config import ConfigError, load_recipe
from titans_train.config.errors import InvalidValueError
from titans_train.errors import UserError
from titans_train.slurm.render import JobShape, render_job, render_prepare
from titans_train.slurm.settings import LAUNCHERS, load_settings



class SlurmError(UserError):
    """A submission that cannot go ahead (SLURM's tools missing, sbatch refusing)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="slurm_command", metavar="ACTION", required=True)
    submit = commands.add_parser("submit", help="render the batch script of a recipe and sbatch it")
    submit.add_argument("recipe", help="a recipe name (`titans-train config list`) or a YAML path")
    submit.add_argument("overrides", nargs="*", help="key=value overrides")
    submit.add_argument("--nodes", type=int, required=True)
    submit.add_argument("--gpus-per-node", type=int, required=True, help="GPUs (= trainer processes) per node")
    submit.add_argument("--cluster", default=None, help="cluster settings YAML (default: $TITANS_TRAIN_CLUSTER)")
    for option in ("partition", "account", "time", "qos"):
        submit.add_argument(f"--{option}", default=None, help="overrides the cluster settings")
    submit.add_argument("--launcher", choices=LAUNCHERS, default=None,
                        help="srun: a task per GPU; torchrun: a task per node (default: cluster settings, else srun)")
    submit.add_argument("--sweep", default=None, help="file of override sets, one run per line (# comments)")
    submit.add_argument("--max-parallel", type=int, default=0, help="sweep tasks running at once (default: all)")
    submit.add_argument("--job-name", default=None, help="default: the run name")
    submit.add_argument("--dry-run", action="store_true", help="print the script; submit nothing")
    prepare = commands.add_parser("prepare", help="data prepare as SLURM arrays: tokenize, shards, then merge")
    from titans_train.data.cli import add_prepare_arguments

    add_prepare_arguments(prepare)
    prepare.add_argument("--tasks", type=int, required=True, help="array tasks for the tokenize and shards stages")
    prepare.add_argument("--max-parallel", type=int, default=0, help="tasks running at once (default: all)")
    prepare.add_argument("--cluster", default=None, help="cluster settings YAML (default: $TITANS_TRAIN_CLUSTER)")
    for option in ("partition", "account", "time", "qos"):
        prepare.add_argument(f"--{option}", default=None, help="overrides the cluster settings")
    prepare.add_argument("--job-name", default="titans-prepare")
    prepare.add_argument("--dry-run", action="store_true", help="print the script and the sbatch calls; submit nothing")
    for name, help_text in (("status", "show the queued/running jobs of a run"), ("cancel", "cancel the jobs of a run")):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("target", help="a run directory (its slurm/jobs file) or a job id")


def read_sweep(path: str) -> list[list[str]]:
    """Override sets, one per non-blank, non-comment line (shell words: quote values with spaces)."""
    if not os.path.isfile(path):
        raise InvalidValueError("--sweep", f"{path} does not exist; pass a file with one line of key=value overrides per run")
    sets = []
    for line in Path(path).read_text().splitlines():
        words = shlex.split(line, comments=True)
        if words:
            sets.append(words)
    if not sets:
        raise InvalidValueError("--sweep", f"{path} holds no override set; write one line of key=value overrides per run")
    return sets


def _recipe_argument(recipe: str) -> str:
    """Recipe paths become absolute (the job may start in another directory); names stay names."""
    return os.path.abspath(recipe) if os.path.exists(recipe) else recipe


def _submit(args: argparse.Namespace) -> int:
    if args.nodes < 1 or args.gpus_per_node < 1:
        raise InvalidValueError("--nodes/--gpus-per-node", "must be >= 1")
    settings = _settings(args)
    shape = JobShape(args.nodes, args.gpus_per_node)
    where = f" (--nodes {args.nodes} x --gpus-per-node {args.gpus_per_node} = world size {shape.world_size})"
    try:
        config = load_recipe(args.recipe, args.overrides, world_size=shape.world_size)
        sweep_sets = read_sweep(args.sweep) if args.sweep else None
        for index, overrides in enumerate(sweep_sets or []):
            try:
                load_recipe(args.recipe, [*args.overrides, *overrides], world_size=shape.world_size)
            except ConfigError as error:
                raise InvalidValueError(f"--sweep {args.sweep} set {index}", str(error)) from None
    except ConfigError as error:
        raise ConfigError(error.key, f"{error.reason}{where}") from None
    _require_sbatch(args)
    run_dir = Path(config.run_dir).absolute()
    slurm_dir = run_dir / "slurm"
    train_args = [_recipe_argument(args.recipe), *args.overrides]
    sweep = None
    if sweep_sets is None:
        train_args.append(f"run_dir={run_dir}")
        output = str(run_dir / "slurm-%j.out")
        script_name = "train.sbatch"
    else:
        sweep_file = slurm_dir / "sweep.txt"
        sweep = (str(sweep_file), len(sweep_sets), args.max_parallel or len(sweep_sets))
        output = str(run_dir / "slurm-%A_%a.out")
        script_name = "sweep.sbatch"
    script = render_job(settings, shape, job_name=args.job_name or config.name, train_args=train_args,
                        output=output, python=sys.executable, sweep=sweep)
    if args.dry_run:
        print(script)
        return 0
    slurm_dir.mkdir(parents=True, exist_ok=True)
    if sweep_sets is not None:
        # A set that names its own run_dir (a scaling study's runs) keeps it; the others get
        # <run_dir>/<task>.
        lines = [shlex.join(overrides if any(word.startswith("run_dir=") for word in overrides)
                            else [*overrides, f"run_dir={run_dir / f'{index:03d}'}"])
                 for index, overrides in enumerate(sweep_sets)]
        _write_atomic(slurm_dir / "sweep.txt", "\n".join(lines) + "\n")
    script_path = slurm_dir / script_name
    _write_atomic(script_path, script)
    job_id = _sbatch(str(script_path))
    with open(slurm_dir / "jobs", "a") as jobs:
        jobs.write(job_id + "\n")
    print(f"submitted job {job_id}: {run_dir} (log {output.replace('%j', job_id).replace('%A', job_id)})")
    return 0


def _settings(args: argparse.Namespace):
    settings = load_settings(args.cluster)
    for option in ("partition", "account", "time", "qos", "launcher"):
        if getattr(args, option, None):
            setattr(settings, option, getattr(args, option))
    return settings


def _require_sbatch(args: argparse.Namespace) -> None:
    if not args.dry_run and shutil.which("sbatch") is None:
        raise SlurmError(f"sbatch is not on PATH: run `titans-train slurm {args.slurm_command}` on a SLURM login node "
                         "(or load SLURM's module), or pass --dry-run to only print the script")


def _sbatch(*arguments: str) -> str:
    result = subprocess.run(["sbatch", "--parsable", *arguments], capture_output=True, text=True)
    if result.returncode != 0:
        raise SlurmError(f"sbatch refused {' '.join(arguments)}: {' '.join(result.stderr.split())}")
    return result.stdout.strip().split(";")[0]


def _prepare(args: argparse.Namespace) -> int:
    if args.tasks < 1:
        raise InvalidValueError("--tasks", f"{args.tasks} must be >= 1")
    settings = _settings(args)
    _require_sbatch(args)
    output_dir = Path(args.output).absolute()
    prepare_args = [*(os.path.abspath(i) if os.path.exists(i) else i for i in args.inputs), "-o", str(output_dir),
                    "--tokenizer", args.tokenizer, "--seq-len", str(args.seq_len), "--text-field", args.text_field,
                    "--seed", str(args.seed), "--shard-mb", str(args.shard_mb), "--quiet"]
    if args.eos_token:
        prepare_args += ["--eos-token", args.eos_token]
    if args.input_format:
        prepare_args += ["--format", args.input_format]
    if args.workers:
        prepare_args += ["--workers", str(args.workers)]
    if args.overwrite:
        prepare_args.append("--overwrite")
    slurm_dir = output_dir.parent / f"{output_dir.name}.slurm"
    script = render_prepare(settings, job_name=args.job_name, prepare_args=prepare_args, num_tasks=args.tasks,
                            output=str(slurm_dir / "prepare-%A_%a.out"), python=sys.executable)
    array = f"--array=0-{args.tasks - 1}%{args.max_parallel or args.tasks}"
    script_path = slurm_dir / "prepare.sbatch"
    if args.dry_run:
        print(script)
        print(f"# sbatch {array} {script_path} tokenize; sbatch {array} --dependency=afterok:<that> ... shards; "
              f"sbatch --dependency=afterok:<that> ... merge")
        return 0
    slurm_dir.mkdir(parents=True, exist_ok=True)
    _write_atomic(script_path, script)
    tokenize = _sbatch(array, str(script_path), "tokenize")
    shards = _sbatch(array, f"--dependency=afterok:{tokenize}", "--kill-on-invalid-dep=yes", str(script_path), "shards")
    merge = _sbatch(f"--dependency=afterok:{shards}", "--kill-on-invalid-dep=yes", str(script_path), "merge")
    with open(slurm_dir / "jobs", "a") as jobs:
        jobs.write(f"{tokenize}\n{shards}\n{merge}\n")
    print(f"submitted prepare of {output_dir}: tokenize {tokenize}, shards {shards}, merge {merge} "
          f"(logs {slurm_dir}/prepare-*.out; `titans-train slurm status {slurm_dir.parent / slurm_dir.name}`)")
    return 0


def _write_atomic(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.write_text(text)
    os.replace(temporary, path)


def job_ids(target: str) -> list[str]:
    """The job ids recorded for a run directory, or the id itself."""
    for jobs_file in (Path(target) / "slurm" / "jobs", Path(target) / "jobs"):
        if jobs_file.is_file():
            return jobs_file.read_text().split()
    if target.split("_")[0].isdigit():
        return [target]
    raise InvalidValueError("target", f"{target} is neither a job id nor a run directory submitted with "
                                      "`titans-train slurm submit` (no slurm/jobs file in it)")


def _status(args: argparse.Namespace) -> int:
    ids = job_ids(args.target)
    result = subprocess.run(["squeue", "-j", ",".join(ids), "-o", "%.18i %.9T %.10M %.6D %R"],
                            capture_output=True, text=True)
    lines = result.stdout.strip().splitlines()
    if len(lines) <= 1:
        print(f"no job of {args.target} is queued or running (jobs {', '.join(ids)}); see its slurm-*.out logs")
    else:
        print("\n".join(lines))
    return 0


def _cancel(args: argparse.Namespace) -> int:
    ids = job_ids(args.target)
    subprocess.run(["scancel", *ids], check=False)
    print(f"cancelled {', '.join(ids)}")
    return 0


def run(args: argparse.Namespace) -> int:
    action = {"submit": _submit, "prepare": _prepare, "status": _status, "cancel": _cancel}[args.slurm_command]
    try:
        return action(args)
    except FileNotFoundError as error:  # squeue/scancel missing
        raise SlurmError(f"{error.filename} is not on PATH: run this on a SLURM login node") from None
