"""The cluster planner (titans_train/plan): byte counts against the model, the relay and the tp
collectives as they run; peak memory against a CPU measurement; the CLI's answers."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from distributed import run_distributed
from titans_train.model import TitansConfig, TitansLM
from titans_train.plan import DEVICES, Hardware, Layout, RunShape, evaluate
from titans_train.plan.cli import add_arguments, run as plan_run
from titans_train.plan.model_facts import model_facts
from titans_train.plan.planner import relay_bytes_per_micro_step, tp_all_reduce_elements

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import planner_accuracy  # noqa: E402

ONE_GPU = Hardware(DEVICES["h100-80gb"], 1, 1)


def small(variant: str) -> TitansConfig:
    return TitansConfig(variant=variant, vocab_size=256, dim=64, n_layers=2, n_heads=4, chunk_size=16,
                        segment_len=32, window=32, n_persistent=4, memory_depth=2, memory_expansion=2)


@pytest.mark.parametrize("variant", ["mac", "mag", "transformer", "lmm"])
def test_model_state_bytes_equal_the_model_and_optimizer(variant):
    config = small(variant)
    model = TitansLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), foreach=False)
    tokens = torch.randint(0, 256, (2, 65))
    model(tokens[:, :-1]).logits.sum().backward()
    optimizer.step()
    plan = evaluate(RunShape(config, 64, 128, 128, "fp32"), ONE_GPU, Layout(zero_stage=0, micro_batch=2))
    parameters = sum(p.numel() * p.element_size() for p in model.parameters())
    gradients = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
    moments = sum(v.numel() * v.element_size() for state in optimizer.state.values()
                  for k, v in state.items() if k in ("exp_avg", "exp_avg_sq"))
    assert plan.term("parameters") == parameters
    assert plan.term("gradients") == gradients
    assert plan.term("optimizer state") == moments
    assert plan.term("master weights") == 0


def test_zero_terms_shard_as_deepspeed_does():
    config = small("lmm")
    run = RunShape(config, 64, 8 * 64, 8 * 64, "bf16")
    hardware = Hardware(DEVICES["h100-80gb"], 1, 8)
    p = model_facts(config, 1).parameters_per_tp_rank
    zero1 = evaluate(run, hardware, Layout(zero_stage=1))
    assert (zero1.term("parameters"), zero1.term("gradients")) == (2 * p, 2 * p)
    assert (zero1.term("master weights"), zero1.term("optimizer state")) == (4 * p / 8, 8 * p / 8)
    zero3 = evaluate(run, hardware, Layout(zero_stage=3))
    assert (zero3.term("parameters"), zero3.term("gradients")) == (2 * p / 8, 2 * p / 8)
    # ZeRO-3 under sp shards over dp only and holds full gradients until one reduction.
    zero3_sp = evaluate(run, hardware, Layout(sp=2, zero_stage=3))
    assert (zero3_sp.term("parameters"), zero3_sp.term("gradients")) == (2 * p / 4, 2 * p)


def _measure_collectives(variant: str, tp: int, sp: int):
    """One forward + backward of `parallel_loss` (rank-local): relay bytes, tp all-reduce elements."""
    import torch.distributed as dist

    from titans_train.parallel import ParallelContext
    from titans_train.parallel.parallelize import parallel_loss, parallelize

    context = ParallelContext.initialize(tp=tp, sp=sp)
    torch.manual_seed(0)
    model = TitansLM(small(variant))
    plan = parallelize(model, None, context)  # shards the model in place
    tokens = torch.randint(0, 256, (2, 129), generator=torch.Generator().manual_seed(1))
    counted = {"all_reduce": 0}
    original = dist.all_reduce

    def all_reduce(tensor, *args, **kwargs):
        counted["all_reduce"] += tensor.numel()
        return original(tensor, *args, **kwargs)

    dist.all_reduce = all_reduce
    step = parallel_loss(model, tokens, plan)
    step.objective.backward()
    step.relay.finish()
    dist.all_reduce = original
    result = {"sp_rank": context.sp_rank, "relay": step.relay.bytes_sent, "all_reduce": counted["all_reduce"]}
    ParallelContext.destroy()
    return result


@pytest.mark.parametrize("variant,tp,sp", [("mag", 2, 1), ("lmm", 1, 2), ("transformer", 1, 2)])
def test_relay_and_tp_bytes_equal_the_measured(variant, tp, sp):
    records = run_distributed(_measure_collectives, world_size=tp * sp, timeout_s=240, variant=variant, tp=tp, sp=sp)
    config = small(variant)
    for record in records:
        assert record["relay"] == relay_bytes_per_micro_step(config, 2, 128, tp, sp, record["sp_rank"], "fp32")
        if tp > 1:  # plus one element: the logged loss, summed over the gradient group
            expected = tp_all_reduce_elements(config, model_facts(config, tp), 2, 128 // sp) + 1
            assert record["all_reduce"] == expected


@pytest.mark.parametrize("case,checkpointing", [
    (("transformer", 256, 4, 4, 8192, 4, 512), False),
    (("mac", 256, 4, 4, 8192, 2, 512), True),
])
def test_peak_prediction_within_15_percent_of_the_measured(case, checkpointing):
    predicted = planner_accuracy.predict(*case, checkpointing)["peak"]
    measured = planner_accuracy.measured_peak(case, checkpointing)
    assert abs(predicted / measured - 1) < 0.15, (predicted / 2**20, measured / 2**20)


def _plan(argv, capsys):
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    code = plan_run(parser.parse_args(argv))
    return code, capsys.readouterr()


def test_a_layout_that_cannot_fit_says_by_how_much_and_what_to_change(capsys):
    code, out = _plan(["mag-760m", "--nodes", "1", "--gpus-per-node", "1", "--gpu", "a100-80gb", "--zero", "0",
                       "--micro-batch", "32", "--no-activation-checkpointing"], capsys)
    assert code == 1
    assert "DOES NOT FIT" in out.out and "GiB over" in out.out
    assert "--activation-checkpointing" in out.out or "--micro-batch" in out.out
    code, out = _plan(["mag-760m", "--nodes", "1", "--gpus-per-node", "1", "--gpu", "a100-80gb", "--zero", "0",
                       "--micro-batch", "32", "--no-activation-checkpointing", "--json"], capsys)
    result = json.loads(out.out)
    assert result["fits"] is False and result["headroom_bytes"] < 0 and result["advice"]


def test_bad_options_are_named(capsys):
    code, out = _plan(["mag-760m", "--tp", "3"], capsys)
    assert code == 2 and "--tp" in out.err


def zero_optimizer_state_bytes(root: str, optimizer_precision: str) -> dict[str, float]:
    """One DeepSpeed ZeRO-1 bf16 step on 2 ranks: the bytes this rank's optimizer holds (master
    partition, Adam moments), and the planner's terms for the same config."""
    from titans_train.config import load_recipe
    from titans_train.plan.planner import layout_of, run_shape
    from titans_train.train.trainer import train
    from titans_train.train.callbacks import Callback

    measured: dict[str, float] = {}

    class Measure(Callback):
        def on_train_end(self, trainer):
            optimizer = trainer.engine.optimizer
            measured["master weights"] = sum(t.numel() * t.element_size()
                                             for t in optimizer.single_partition_of_fp32_groups)
            measured["optimizer state"] = sum(v.numel() * v.element_size() for state in optimizer.optimizer.state.values()
                                              for k, v in state.items() if k in ("exp_avg", "exp_avg_sq"))
            measured["moment dtypes"] = sorted({str(v.dtype) for state in optimizer.optimizer.state.values()
                                                for k, v in state.items() if k in ("exp_avg", "exp_avg_sq")})

    config = load_recipe("debug", ["train.precision=bf16", f"train.optimizer_precision={optimizer_precision}",
                                   "parallel.zero_stage=1", "train.steps=1", "train.warmup_steps=0",
                                   "checkpoint.interval=0", f"run_dir={root}/{optimizer_precision}"], world_size=2)
    train(config, callbacks=[Measure()])
    plan = evaluate(run_shape(config), Hardware(DEVICES["h100-80gb"], 1, 2), layout_of(config))
    return {**measured, "planned": {name: plan.term(name) for name in ("master weights", "optimizer state")}}


@pytest.mark.slow
def test_bf16_optimizer_state_is_bf16_and_holds_the_planned_bytes(tmp_path):
    rank0, rank1 = run_distributed(zero_optimizer_state_bytes, 2, 300, init_process_group=False,
                                   root=str(tmp_path), optimizer_precision="bf16")
    assert rank0["moment dtypes"] == rank1["moment dtypes"] == ["torch.bfloat16"], rank0
    for name in ("master weights", "optimizer state"):
        # ZeRO-1 splits the flat buffer into equal, aligned partitions: each rank holds P / 2 up
        # to that padding (a few elements).
        total = rank0[name] + rank1[name]
        assert abs(total / 2 - rank0["planned"][name]) <= 64, (name, rank0, rank1)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_buffers_are_sized_by_one_rule_for_the_engine_and_the_planner(stage):
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    from titans_train.config import batch_plan, load_recipe, model_config
    from titans_train.parallel import ParallelContext
    from titans_train.parallel.zero_buckets import MIN_BUCKET_ELEMENTS
    from titans_train.plan.planner import layout_of, run_shape
    from titans_train.train.engine import deepspeed_config

    hardware = Hardware(DEVICES["h100-80gb"], 1, 8)
    for recipe, override, bucket in (("mac-1.3b", 0, MIN_BUCKET_ELEMENTS),  # dim 2048: the floor
                                     ("mac-7b", 0, 4096**2),  # dim 4096: dim^2
                                     ("mac-1.3b", 500_000_000, 500_000_000)):  # DeepSpeed's default, asked for
        config = load_recipe(recipe, [f"parallel.zero_stage={stage}", "parallel.tp=1", "parallel.sp=1",
                                      f"parallel.zero_bucket_elements={override}"], world_size=8)
        layer = model_facts(model_config(config), 1).layer_parameters_per_tp_rank
        zero = deepspeed_config(config, batch_plan(config, 1), ParallelContext.initialize())["zero_optimization"]
        parsed = DeepSpeedZeroConfig(**zero)  # DeepSpeed's own parser: every key is one it reads
        assert parsed.reduce_bucket_size == bucket, (recipe, zero)
        plan = evaluate(run_shape(config), hardware, layout_of(config))
        if stage < 3:
            assert parsed.allgather_bucket_size == bucket
        if stage == 2:
            assert plan.term("gradient reduction bucket") == 2 * bucket  # bf16 gradients
        if stage == 3:
            assert (parsed.prefetch_bucket_size, parsed.sub_group_size) == (int(0.9 * bucket), bucket)
            assert parsed.max_reuse_distance == layer  # only the last layer stays gathered into backward
            assert parsed.max_live_parameters == max(2 * layer, 2 * bucket)
            assert parsed.param_persistence_threshold == 0
            assert plan.term("ZeRO-3 gathered parameters") == 2 * (layer + int(0.9 * bucket))


def test_a_negative_zero_bucket_is_refused_with_the_key():
    from titans_train.config import InvalidValueError, load_recipe

    with pytest.raises(InvalidValueError, match="parallel.zero_bucket_elements.*>= 1"):
        load_recipe("mac-1.3b", ["parallel.zero_bucket_elements=-1"], world_size=8)
