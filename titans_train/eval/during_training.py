"""Evaluation tasks inside a training run (`train.eval_tasks` at each validation).

The trainer's model (tp-sharded for the run's layout) is evaluated with `run_tasks`: under ZeRO
0-2 in place (every rank holds its tp shard whole), under ZeRO-3 as a copy whose parameters are
gathered once per evaluation (ZeRO-3 partitions them between forward passes; the copy holds one
tp shard of the model). Every rank of the gradient group (dp x sp) is a replica taking its strided
part of the items, so the numbers are those `titans-train eval` gives for a checkpoint of the
same weights. `ppl` reads the run's validation split; the retrieval tasks use
the run's seed.
"""

from __future__ import annotations

import numpy as np

from titans_train.config.errors import InvalidValueError
from titans_train.eval.errors import EvalOptionError


class TrainingEvaluation:
    def __init__(self, trainer):
        self.trainer = trainer
        self._held_out: np.ndarray | None = None

    def _options(self):
        from titans_train.eval.tasks import EvalOptions, parse_lengths

        train = self.trainer.config.train
        lengths = parse_lengths(",".join(str(length) for length in train.eval_lengths), train.seq_len)
        return EvalOptions(tasks=list(train.eval_tasks), lengths=lengths, seed=train.seed)

    def held_out(self) -> np.ndarray:
        from titans_train.eval.ppl import held_out_stream

        if self._held_out is None:
            directory = self.trainer.data.validation_loader.stream.datasets[0].directory
            self._held_out = held_out_stream(directory, self.trainer.data.tokenizer)
        return self._held_out

    def model(self):
        """The model to evaluate: the live one, or under ZeRO-3 a gathered copy of this rank's shard."""
        trainer = self.trainer
        live = trainer.engine.module.model
        if trainer.config.parallel.zero_stage < 3:
            return live
        import deepspeed
        import torch

        from titans_train.model import TitansLM
        from titans_train.model.init import given_tensor
        from titans_train.parallel.construction import materialise
        from titans_train.parallel.parallelize import parallelize

        # Built on meta and filled from the gathered weights: no initial values drawn to be overwritten.
        with torch.device("meta"):
            copy = TitansLM(trainer.titans_config)
            parallelize(copy, trainer.config.parallel, trainer.context)
        partitioned = dict(live.named_parameters())
        device = next(iter(partitioned.values())).device
        with deepspeed.zero.GatheredParameters(list(partitioned.values())):
            materialise(copy, {name: given_tensor(parameter.data) for name, parameter in partitioned.items()}, device)
        return copy

    def run(self) -> dict:
        """Results by task, the same on every rank."""
        from titans_train.eval.distributed import EvalLayout
        from titans_train.eval.tasks import run_tasks

        trainer = self.trainer
        try:
            options = self._options()
            held_out = self.held_out() if "ppl" in options.tasks else None
            return run_tasks(self.model(), trainer.data.tokenizer,
                             EvalLayout.from_context(trainer.context), options, trainer.config.train.seq_len,
                             held_out)
        except EvalOptionError as error:
            key = "train.eval_lengths" if error.option == "--lengths" else "train.eval_tasks"
            raise InvalidValueError(key, str(error).removeprefix(f"{error.option}: ")) from None
