"""The run configuration: one structured dataclass per concern, composed into `RunConfig`.

Every field has a default so a recipe only states what it changes. The model section is the
model package's own `TitansConfig` (one source of truth for model hyperparameters); everything
else is defined here. Cross-field rules (batch arithmetic, parallel degrees) live in
`titans_train.config.validate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List

SCHEDULES = ("cosine", "wsd", "constant")
PRECISIONS = ("fp32", "bf16")
WANDB_MODES = ("offline", "online", "disabled")
BACKENDS = ("auto", "gloo", "nccl")


@dataclass
class DataConfig:
    # "builtin": the Python standard library's source, prepared into `cache_dir` on first use.
    # "shards": `train_dir` / `validation_dir` name prepared shard directories
    # (`titans-train data prepare`). A train_dir alone is enough: source, tokenizer, train.seq_len
    # and model.vocab_size then come from its manifest (titans_train/config/dataset_defaults.py).
    source: str = "builtin"
    train_dir: str = ""
    validation_dir: str = ""
    tokenizer: str = "byte"
    # Content checks on every sample read (docs/data.md): "full" checks each member's CRC-32
    # digest and token ids, "sampled" the ids and one digest in 8 reads, "none" the layout only.
    verify: str = "full"
    # Where the built-in corpus is prepared. Empty: $TITANS_TRAIN_CACHE or ~/.cache/titans-train.
    cache_dir: str = ""
    num_workers: int = 0


@dataclass
class TrainConfig:
    # Length of the run: exactly one of `tokens` and `steps` is > 0.
    tokens: int = 0
    steps: int = 0
    # One optimizer step consumes `global_batch_tokens` tokens = global batch samples x seq_len;
    # gradient accumulation = samples / (micro_batch_size x data-parallel size).
    global_batch_tokens: int = 524288
    micro_batch_size: int = 8
    seq_len: int = 4096
    lr: float = 4e-4
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    warmup_steps: int = 0
    schedule: str = "cosine"
    min_lr: float = 4e-5
    # wsd only: the final fraction of the steps over which the lr decays to min_lr.
    decay_fraction: float = 0.2
    grad_clip: float = 1.0
    seed: int = 0
    precision: str = "fp32"
    # bf16 runs with ZeRO >= 1 only: master weights, gradients and Adam moments in bf16 too
    # (8 bytes a parameter instead of 16), DeepSpeed's bf16_optimizer_states. Less exact updates.
    optimizer_precision: str = "fp32"
    # Validation every `eval_interval` steps (0: only at start and end) on the first
    # `eval_batches` x `micro_batch_size` samples of the validation split, whatever the number
    # of processes (so the same loss on any layout).
    eval_interval: int = 0
    eval_batches: int = 8
    # Evaluation tasks run with each validation (titans_train.eval: ppl, niah, babilong, mqar; see
    # docs/evals.md) at `eval_lengths` (multiples of seq_len such as "2x", or token counts).
    eval_tasks: List[str] = field(default_factory=list)
    eval_lengths: List[str] = field(default_factory=lambda: ["1x"])
    # Start from these weights (a training checkpoint of any layout, or a `convert --to hf` dir);
    # empty: fresh initialisation. A resumable checkpoint in checkpoint.dir takes precedence.
    init_from: str = ""


@dataclass
class ParallelConfig:
    tp: int = 1
    sp: int = 1
    zero_stage: int = 1
    # Recompute each layer's activations in backward (saves memory, costs ~1 extra forward).
    activation_checkpointing: bool = False
    # Shard the residual stream and its norms along T over the tp ranks (ignored at tp = 1).
    tp_sequence_sharding: bool = False
    # Sequence-parallel schedule: "relay" (wavefront, any model) or "scan" (lockstep, lmm/mag/mal with memory_depth 1).
    sp_schedule: str = "relay"
    # "auto": nccl when CUDA is available, gloo otherwise.
    backend: str = "auto"
    # ZeRO's gradient reduction / all-gather bucket in elements (ZeRO-3 prefetches 0.9 x it).
    # 0: from the model, max(dim^2, 2^24) (titans_train/parallel/zero_buckets.py, docs/scaling.md).
    zero_bucket_elements: int = 0
    # How long a collective may wait for the other ranks before the job fails (a hung or frozen
    # rank): minutes, not torch's 30-minute default. Raise it for very long checkpoint writes.
    timeout_s: int = 600


@dataclass
class CheckpointConfig:
    # Empty: `<run_dir>/checkpoints`.
    dir: str = ""
    # Save every `interval` optimizer steps (0: only at the end and on a signal).
    interval: int = 1000
    keep_last: int = 3
    auto_resume: bool = True
    save_final: bool = True


@dataclass
class LoggingConfig:
    wandb_mode: str = "offline"
    wandb_project: str = "titans-train"
    # Empty: the run name.
    wandb_name: str = ""
    # Runs sharing a group are shown together in wandb (a scaling study sets its name). Empty: none.
    wandb_group: str = ""
    # Console + metrics.jsonl every `interval` steps.
    interval: int = 10
    # Per-layer Titans telemetry (mean theta/eta/alpha, memory-update norm) every N steps (0: off).
    telemetry_interval: int = 50
    # Peak dense FLOP/s of one device, for MFU (A100 bf16 = 312e12). 0: MFU not reported.
    peak_flops_per_device: float = 312e12


@dataclass
class RunConfig:
    name: str = "run"
    # Everything a run writes (metrics.jsonl, resolved config, checkpoints, wandb) goes here.
    # Empty: `runs/<name>`.
    run_dir: str = ""
    model: Any = None  # replaced by the model package's TitansConfig schema at load time
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
