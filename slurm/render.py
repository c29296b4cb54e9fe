"""Job scripts from the templates in `templates/`: `{{name}}` placeholders, all of them required.

Values are shell-quoted here, once, so a recipe path or an override with spaces survives; the
templates only place them. `render_job` returns the script text; nothing is written or submitted.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from importlib.resources import files

from titans_train.slurm.settings import ClusterSettings

PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


def template_text(name: str) -> str:
    return files("titans_train.slurm").joinpath("templates", name).read_text()


def fill(template: str, values: dict[str, str]) -> str:
    """Replace every {{name}}; a placeholder without a value is a bug in the caller, so it raises."""
    def value(match: re.Match) -> str:
        name = match.group(1)
        if name not in values:
            raise KeyError(f"template placeholder {{{{{name}}}}} has no value")
        return str(values[name])

    return PLACEHOLDER.sub(value, template)


@dataclass(frozen=True)
class JobShape:
    nodes: int
    gpus_per_node: int  # also the trainer processes per node

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


def _step_command(settings: ClusterSettings, shape: JobShape) -> str:
    container = settings.container.strip()
    prefix = f"{container} " if container else ""
    if settings.launcher == "torchrun":
        return (f'STEP=(srun --ntasks-per-node=1 {prefix}"$PYTHON" -m titans_train.slurm.node_launch '
                f'--nproc-per-node {shape.gpus_per_node} -- train "${{TRAIN_ARGS[@]}}")')
    return f'STEP=(srun --kill-on-bad-exit=0 {prefix}"$PYTHON" -m titans_train train "${{TRAIN_ARGS[@]}}")'


def _sbatch_lines(settings: ClusterSettings, shape: JobShape | None) -> list[str]:
    """#SBATCH lines of the settings; GPUs only for a training shape (data preparation needs none)."""
    options = []
    for option in ("partition", "account", "qos", "time"):
        if getattr(settings, option):
            options.append(f"--{option}={getattr(settings, option)}")
    if settings.request_gpus and shape is not None:
        options.append(f"--gpus-per-node={shape.gpus_per_node}")
    if settings.cpus_per_task:
        options.append(f"--cpus-per-task={settings.cpus_per_task}")
    options += settings.sbatch_options
    return [f"#SBATCH {option}" for option in options]


def _env_lines(settings: ClusterSettings) -> str:
    return "\n".join(f"export {key}={shlex.quote(str(value))}" for key, value in settings.env.items())


def render_prepare(settings: ClusterSettings, *, job_name: str, prepare_args: list[str], num_tasks: int, output: str,
                   python: str) -> str:
    """The data-preparation script; its first argument is the stage (tokenize, shards, merge)."""
    container = settings.container.strip()
    return fill(template_text("prepare.sbatch"), {
        "job_name": job_name, "output": output, "num_tasks": num_tasks,
        "sbatch_lines": "\n".join(_sbatch_lines(settings, None)),
        "setup_lines": "\n".join(settings.setup), "env_lines": _env_lines(settings),
        "container": f"{container} " if container else "", "python": shlex.quote(settings.python or python),
        "prepare_args": shlex.join(prepare_args),
    })


def render_job(settings: ClusterSettings, shape: JobShape, *, job_name: str, train_args: list[str], output: str,
               python: str, sweep: tuple[str, int, int] | None = None) -> str:
    """The batch script: train.sbatch, or sweep.sbatch when `sweep` = (file, tasks, max parallel)."""
    tasks_per_node = 1 if settings.launcher == "torchrun" else shape.gpus_per_node
    launch = fill(template_text("launch.sh"), {
        "python": shlex.quote(settings.python or python),
        "max_requeues": settings.max_requeues,
        "env_lines": _env_lines(settings),
        "step_command": _step_command(settings, shape),
    })
    values = {
        "job_name": job_name, "nodes": shape.nodes, "tasks_per_node": tasks_per_node, "output": output,
        "signal_grace_seconds": settings.signal_grace_seconds,
        "sbatch_lines": "\n".join(_sbatch_lines(settings, shape)),
        "setup_lines": "\n".join(settings.setup),
        "train_args": shlex.join(train_args),
        "launch": launch,
    }
    if sweep is None:
        return fill(template_text("train.sbatch"), values)
    sweep_file, tasks, max_parallel = sweep
    values.update(sweep_file=shlex.quote(sweep_file), last_task=tasks - 1, max_parallel=max_parallel)
    return fill(template_text("sweep.sbatch"), values)
