"""LR schedules: warmup, cosine, wsd, constant, as used by the optimizer step by step."""

from __future__ import annotations

import math

import pytest
import torch

from titans_train.config import load_recipe
from titans_train.train.schedule import build_scheduler, lr_at

BASE = dict(lr=1.0, min_lr=0.1, warmup_steps=10, total_steps=110)


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_warmup_is_linear_up_to_the_peak(schedule):
    values = [lr_at(step, schedule=schedule, **BASE) for step in range(10)]
    assert values == pytest.approx([(step + 1) / 10 for step in range(10)])


def test_cosine_reaches_min_lr_at_the_last_step_and_is_monotone():
    values = [lr_at(step, schedule="cosine", **BASE) for step in range(10, 110)]
    assert values[0] == pytest.approx(1.0) and values[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(values, values[1:]))
    midpoint = lr_at(10 + 99 // 2, schedule="cosine", **BASE)
    assert midpoint == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 49 / 99)))


def test_wsd_is_flat_then_decays_linearly_over_the_final_fraction():
    values = [lr_at(step, schedule="wsd", decay_fraction=0.2, **BASE) for step in range(110)]
    assert values[10:90] == pytest.approx([1.0] * 80)  # decay over the last 20 of 100 steps
    assert values[-1] == pytest.approx(0.1)
    decay = values[90:]
    assert all(a > b for a, b in zip(decay, decay[1:]))
    assert decay[0] == pytest.approx(1.0 - 0.9 / 20)


def test_constant_stays_at_the_peak():
    assert {lr_at(step, schedule="constant", **BASE) for step in range(10, 200)} == {1.0}


def test_scheduler_drives_the_optimizer_lr_per_step():
    config = load_recipe("debug", ["train.steps=20", "train.warmup_steps=4", "train.schedule=wsd"])
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([parameter], lr=config.train.lr)
    scheduler = build_scheduler(optimizer, config.train, total_steps=20)
    seen = []
    for _ in range(20):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [lr_at(step, lr=3e-3, min_lr=3e-4, warmup_steps=4, total_steps=20, schedule="wsd") for step in range(20)]
    assert seen == pytest.approx(expected)
