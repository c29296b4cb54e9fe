"""The data side of a run: tokenizer, this rank's training micro-batches, validation batches.

A thin adapter over `titans_train.data`: the built-in corpus is prepared on first use (one rank
prepares under a file lock, the others wait), prepared shard directories are opened, and the
training loader's position (a global sample count) is what checkpoints store, so a run resumes
exactly on any data-parallel size.

Validation reads the first `train.eval_batches x train.micro_batch_size` samples of the
validation split (unshuffled), split over the data-parallel ranks: the same samples at every
evaluation of a run and on any number of processes (`Trainer.evaluate`).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import torch
from omegaconf import DictConfig

from titans_train.config.validate import BatchPlan


class RunData:
    def __init__(self, tokenizer, train_loader, validation_loader):
        self.tokenizer = tokenizer
        self.train_loader = train_loader
        self.validation_loader = validation_loader

    def train_batches(self) -> Iterator[torch.Tensor]:
        """(micro_batch, seq_len + 1) LongTensors, continuing from the loader's position."""
        return iter(self.train_loader)

    def validation_batches(self) -> Iterator[torch.Tensor]:
        self.validation_loader.rewind()
        return iter(self.validation_loader)

    def validation_samples(self, positions: list[int]) -> torch.Tensor:
        """(len(positions), seq_len + 1) LongTensor: the validation split's samples at `positions`."""
        import numpy as np

        _, _, tokens = self.validation_loader.stream.read(np.asarray(positions, dtype=np.int64))
        return torch.from_numpy(tokens)

    def state_dict(self) -> dict[str, Any]:
        return self.train_loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.train_loader.load_state_dict(state)


def dataset_directories(config: DictConfig, log: Callable[[str], None]) -> tuple[str, str]:
    data = config.data
    if data.source == "builtin":
        from titans_train.data import builtin_corpus

        log("data: the built-in corpus (Python standard library sources); prepared on first use")
        return builtin_corpus(data.cache_dir or None, tokenizer=data.tokenizer, seq_len=config.train.seq_len,
                              num_workers=max(data.num_workers, 1))
    validation_dir = data.validation_dir or data.train_dir
    if not data.validation_dir:
        log("WARNING: data.validation_dir is empty: validating on the training split")
    return data.train_dir, validation_dir


def build_run_data(config: DictConfig, context, plan: BatchPlan, log: Callable[[str], None] = print) -> RunData:
    from titans_train.data import TokenLoader, load_tokenizer

    tokenizer = load_tokenizer(config.data.tokenizer)
    train_dir, validation_dir = dataset_directories(config, log)
    train = config.train
    common = dict(seq_len=train.seq_len, micro_batch_size=train.micro_batch_size, dp_rank=context.data_rank,
                  dp_world_size=context.data_world_size, seed=train.seed, tokenizer=tokenizer,
                  verify=config.data.verify)
    train_loader = TokenLoader(train_dir, global_batch_size=plan.global_batch_samples,
                               num_workers=config.data.num_workers, **common)
    validation_loader = TokenLoader(validation_dir, global_batch_size=train.micro_batch_size * context.data_world_size,
                                    shuffle=False, **common)
    return RunData(tokenizer, train_loader, validation_loader)
