"""The objective DeepSpeed wraps, in a world of one: next-token loss; activation checkpointing
changes nothing."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from titans_train.config import load_recipe, model_config
from titans_train.model import TitansLM
from titans_train.parallel import ParallelContext
from titans_train.parallel.parallelize import ParallelObjective, parallelize


def objective(model: TitansLM, activation_checkpointing: bool = False) -> ParallelObjective:
    from titans_train.config.schema import ParallelConfig

    plan = parallelize(model, ParallelConfig(activation_checkpointing=activation_checkpointing),
                       ParallelContext.initialize())
    return ParallelObjective(model, plan)


def _model(variant: str) -> TitansLM:
    torch.manual_seed(0)
    return TitansLM(model_config(load_recipe("debug", [f"model.variant={variant}"])))


def test_loss_is_mean_next_token_cross_entropy():
    model = _model("mac")
    tokens = torch.randint(0, 257, (2, 33))
    step = objective(model)(tokens)
    logits = model(tokens[:, :-1]).logits
    expected = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    torch.testing.assert_close(step.loss, expected)
    torch.testing.assert_close(step.objective, expected)
    assert step.telemetry is None


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    for variant in ("mac", "mag", "mal", "lmm", "transformer"):
        plain = _model(variant)
        checkpointed = copy.deepcopy(plain)
        tokens = torch.randint(0, 257, (2, 41))
        loss_plain = objective(plain)(tokens).objective
        loss_ckpt = objective(checkpointed, activation_checkpointing=True)(tokens).objective
        loss_plain.backward()
        loss_ckpt.backward()
        torch.testing.assert_close(loss_ckpt, loss_plain, rtol=0, atol=0)
        for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-6, atol=1e-7, msg=f"{variant} {name}")


def test_telemetry_is_returned_per_layer():
    telemetry = objective(_model("mac"))(torch.randint(0, 257, (1, 17)), return_telemetry=True).telemetry
    assert {f"layers.{i}.memory.{n}" for i in range(2) for n in ("theta", "eta", "alpha", "update_norm")} <= set(telemetry)
