"""SLURM jobs: sbatch templates, cluster settings, and the SLURM -> torch.distributed mapping.

Installed as `titans_train.slurm` (the folder `slurm/` at the repository root, like `recipes/`).
- `environment`: rank variables from SLURM's (`srun` one task per GPU) and the rendezvous of the
  torchrun-per-node mode; node-list expansion.
- `settings`: the cluster-specific settings (partition, account, NCCL variables, module loads,
  container), one YAML file.
- `render`: templates/*.sbatch -> a job script in the run directory.
- `node_launch`: torchrun's agent, one per node, reporting the workers' exit code.
- `cli`: `titans-train slurm submit|status|cancel`.
See docs/slurm.md.
"""
