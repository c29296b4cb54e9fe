"""`parallel.tp_sequence_sharding`: the norm regions split along the sequence over the tp ranks.

Same method as test_parallel_exactness.py (whose helpers are imported): every rank builds the
same tiny model, computes the single-process reference itself, shards a copy with the option on
and compares loss and every gradient (gathered to full shape) to 1e-5 relative, fp32. Besides
exactness, the point of the option is checked: the hidden states between blocks are
(B, T / (sp x tp), D) on each rank and hold exactly that rank's slice of the reference's.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from distributed import run_distributed
from test_parallel_exactness import (
    MICRO_BATCH,
    SEQ_LEN,
    TOLERANCE,
    _optimizer,
    assert_records,
    global_batch,
    reference_loss,
    relative_error,
    tiny_config,
    worst,
)
from titans_train.config import InvalidValueError, load_recipe
from titans_train.config.schema import ParallelConfig
from titans_train.model import VARIANTS, TitansLM
from titans_train.parallel import ParallelConfigError, ParallelContext
from titans_train.parallel.parallelize import parallel_loss, parallelize
from titans_train.parallel.sequence_parallel import average_gradients
from titans_train.parallel.tensor_parallel import gather_full_gradients, gather_full_parameters
from titans_train.parallel.validation import validate_parallel_layout, validate_tp_sequence_sharding

# Linear-memory variants under sp_schedule="scan" (test_parallel_scan_schedule.py runs mal).
SCAN_VARIANTS = ("lmm", "mag")


def _record_hidden(model: TitansLM) -> list[torch.Tensor]:
    """Hooks keeping the embedding output and every block's output hidden states."""
    recorded = []
    model.embedding.register_forward_hook(lambda module, args, out: recorded.append(out.detach()))
    for layer in model.layers:
        layer.register_forward_hook(lambda module, args, out: recorded.append(out[0].detach()))
    return recorded


def _sharded(tp: int, sp: int, activation_checkpointing: bool = False, sp_schedule: str = "relay") -> ParallelConfig:
    return ParallelConfig(tp=tp, sp=sp, tp_sequence_sharding=True,
                          activation_checkpointing=activation_checkpointing, sp_schedule=sp_schedule)


def check_sharded_layouts(layouts):
    """(tp, sp, activation checkpointing, variants, sp schedule): loss, gradients and hidden-state
    shards. The "scan" schedule runs linear memories (memory_depth 1)."""
    records = []
    for tp, sp, activation_checkpointing, variants, sp_schedule in layouts:
        context = ParallelContext.initialize(tp=tp, sp=sp)
        for variant in variants:
            torch.manual_seed(0)
            config = tiny_config(variant)
            model = TitansLM(replace(config, memory_depth=1) if sp_schedule == "scan" else config)
            reference = copy.deepcopy(model)
            tokens = global_batch(seed=1, samples=MICRO_BATCH * context.layout.dp)
            replica_tokens = tokens.chunk(context.layout.dp)[context.data_rank]
            expected_hidden = _record_hidden(reference)
            expected_loss = reference_loss(reference, tokens)
            expected_loss.backward()
            expected_grads = {name: p.grad for name, p in reference.named_parameters()}

            plan = parallelize(model, _sharded(tp, sp, activation_checkpointing, sp_schedule), context)
            hidden = _record_hidden(model)
            step = parallel_loss(model, replica_tokens, plan)
            step.objective.backward()
            step.relay.finish()
            average_gradients(model, context)
            grad_error, grad_name = worst(gather_full_gradients(model, context), expected_grads)
            with torch.no_grad():  # evaluation path: no autograd, telemetry from every layer
                evaluation = parallel_loss(model, replica_tokens, plan, return_telemetry=True)
                evaluation.relay.finish()
                expected_telemetry = reference(tokens[:1, :-1], return_telemetry=True).telemetry

            # This rank's tokens: its span (sp), then its shard of the span (tp).
            shard_len = SEQ_LEN // (sp * tp)
            start = context.sp_rank * (SEQ_LEN // sp) + context.tp_rank * shard_len
            first_sample = slice(context.data_rank * MICRO_BATCH, (context.data_rank + 1) * MICRO_BATCH)
            hidden = hidden[: len(model.layers) + 1]  # the training forward (ckpt recomputes more)
            hidden_error = max(
                relative_error(value, expected[first_sample, start:start + shard_len])
                for value, expected in zip(hidden, expected_hidden))
            layout = (f"sharded tp={tp} sp={sp} dp={context.layout.dp} {sp_schedule}"
                      + " ckpt" * activation_checkpointing)
            records.append(dict(
                layout=layout, variant=variant,
                loss_error=max(relative_error(step.loss, expected_loss.detach()),
                               relative_error(evaluation.loss, expected_loss.detach())),
                grad_error=grad_error, grad_name=grad_name, hidden_error=hidden_error,
                telemetry_keys=(sorted(evaluation.telemetry), sorted(expected_telemetry)),
                hidden_shapes=sorted({tuple(value.shape) for value in hidden}),
                expected_shape=(MICRO_BATCH, shard_len, model.config.dim),
                sharded=plan.sequence_sharding))
    ParallelContext.destroy()
    return records


def check_adamw_steps(tp, sp, variants, steps=3):
    """Plain AdamW (no DeepSpeed) on the shards for `steps` steps: the losses of every step, the
    gradients of the first and the parameters after the last equal the single-process run's."""
    records = []
    context = ParallelContext.initialize(tp=tp, sp=sp)
    for variant in variants:
        torch.manual_seed(0)
        model = TitansLM(tiny_config(variant))
        reference = copy.deepcopy(model)
        reference_optimizer = _optimizer(reference.parameters())
        plan = parallelize(model, _sharded(tp, sp), context)
        optimizer = _optimizer(model.parameters())
        loss_error = 0.0
        for step_index in range(steps):
            tokens = global_batch(seed=100 + step_index, samples=MICRO_BATCH * context.layout.dp)
            reference_optimizer.zero_grad()
            expected_loss = reference_loss(reference, tokens)
            expected_loss.backward()

            optimizer.zero_grad()
            step = parallel_loss(model, tokens.chunk(context.layout.dp)[context.data_rank], plan)
            step.objective.backward()
            step.relay.finish()
            average_gradients(model, context)
            if step_index == 0:
                grad_error, grad_name = worst(
                    gather_full_gradients(model, context),
                    {name: p.grad for name, p in reference.named_parameters()})
            reference_optimizer.step()
            optimizer.step()
            loss_error = max(loss_error, relative_error(step.loss, expected_loss.detach()))
        param_error, param_name = worst(gather_full_parameters(model, context),
                                        {name: p.detach() for name, p in reference.named_parameters()})
        records.append(dict(layout=f"sharded tp={tp} sp={sp} AdamW x{steps}", variant=variant,
                            loss_error=loss_error, grad_error=grad_error, grad_name=grad_name,
                            param_error=param_error, param_name=param_name))
    ParallelContext.destroy()
    return records


def check_call_length_not_divisible_by_tp_is_refused():
    """A sharded model's forward on a length that does not split over tp (e.g. decoding one
    token): the error names the option, not a megatron assertion."""
    context = ParallelContext.initialize(tp=2, sp=1)
    model = TitansLM(tiny_config("lmm"))
    parallelize(model, _sharded(2, 1), context)
    try:
        model(global_batch(seed=1, samples=1)[:, :7])
    except ParallelConfigError as error:
        return error.key, str(error)
    finally:
        ParallelContext.destroy()
    return None


def check_norm_outputs_saved_as_shards():
    """Which saved tensors the pack hook replaces by T-shards during one training forward: the
    distinct gathered outputs (one per norm) and the shapes of what they were replaced by."""
    from titans_train.parallel import tp_sequence_sharding as sharding

    context = ParallelContext.initialize(tp=2, sp=1)
    model = TitansLM(tiny_config("lmm"))
    plan = parallelize(model, _sharded(2, 1), context)
    replaced = {}
    original_pack = sharding._pack

    def pack(tensor):
        packed = original_pack(tensor)
        if not isinstance(packed, torch.Tensor):
            replaced[id(packed[0])] = tuple(packed[0].shard.shape)
        return packed

    sharding._pack = pack
    try:
        step = parallel_loss(model, global_batch(seed=1, samples=MICRO_BATCH), plan)
    finally:
        sharding._pack = original_pack
    step.objective.backward()  # re-gathers them
    step.relay.finish()
    ParallelContext.destroy()
    return len(model.layers), sorted(replaced.values())


def check_layouts_and_steps(layouts, adamw, single_model_checks=False):
    single = None
    if single_model_checks:
        single = (check_call_length_not_divisible_by_tp_is_refused(), check_norm_outputs_saved_as_shards())
    return check_sharded_layouts(layouts), check_adamw_steps(**adamw), single


def assert_sharded(records):
    assert_records(records)
    for record in records:
        assert record["sharded"], record
        # The point of the option: between blocks each rank holds (B, T / (sp x tp), D) ...
        assert record["hidden_shapes"] == [record["expected_shape"]], record
        # ... and it is exactly its slice of the single-process residual stream.
        assert record["hidden_error"] <= TOLERANCE, record


@pytest.mark.slow
def test_tp2_sharded_matches_one_process_for_every_variant_with_checkpointing_and_adamw():
    records, adamw_records, (refusal, saved_as_shards) = run_distributed(
        check_layouts_and_steps, world_size=2, timeout_s=180,
        layouts=[(2, 1, False, VARIANTS, "relay"), (2, 1, True, ("mac",), "relay")],
        adamw=dict(tp=2, sp=1, variants=("mac",)), single_model_checks=True)[0]
    assert len(records) == len(VARIANTS) + 1
    assert_sharded(records)
    assert len(adamw_records) == 1
    assert_records(adamw_records)
    key, message = refusal
    assert key == "parallel.tp_sequence_sharding" and "7 tokens over tp = 2" in message
    # Every norm's gathered output (2 per layer and the final norm) is kept for backward as
    # this rank's (B, T/tp, D) shard, not whole.
    n_layers, shard_shapes = saved_as_shards
    assert shard_shapes == [(MICRO_BATCH, SEQ_LEN // 2, tiny_config("lmm").dim)] * (2 * n_layers + 1)


@pytest.mark.slow
def test_tp2_sp2_sharded_matches_one_process_for_every_variant_and_the_scan_schedule():
    records, adamw_records, _ = run_distributed(
        check_layouts_and_steps, world_size=4, timeout_s=240,
        layouts=[(2, 2, False, VARIANTS, "relay"), (2, 2, False, SCAN_VARIANTS, "scan")],
        adamw=dict(tp=2, sp=2, variants=("mag",)))[0]
    assert len(records) == len(VARIANTS) + len(SCAN_VARIANTS)
    assert_sharded(records)
    assert_records(adamw_records)


def test_span_not_divisible_by_tp_is_refused_with_the_numbers_and_the_fix():
    model_config = tiny_config("transformer")  # no chunk: any span length is valid for sp
    with pytest.raises(ParallelConfigError) as info:
        validate_parallel_layout(model_config, tp=4, sp=2, world_size=8, seq_len=36,
                                 tp_sequence_sharding=True)
    assert info.value.key == "parallel.tp_sequence_sharding"
    message = str(info.value)
    assert "36 / 2 = 18" in message and "parallel.tp = 4" in message
    assert "parallel.tp_sequence_sharding=false" in message  # one of the fixes offered
    # The same layout without the option is valid, and so is the option with a span that splits.
    validate_parallel_layout(model_config, tp=4, sp=2, world_size=8, seq_len=36)
    validate_parallel_layout(model_config, tp=4, sp=2, world_size=8, seq_len=32,
                             tp_sequence_sharding=True)


def test_option_is_ignored_at_tp1():
    validate_tp_sequence_sharding(tp=1, sp=2, seq_len=18, enabled=True)
    plan = parallelize(TitansLM(tiny_config("lmm")), _sharded(1, 1), ParallelContext.initialize())
    assert plan.sequence_sharding is False


def test_config_validation_names_the_key_before_any_work():
    with pytest.raises(InvalidValueError) as info:
        load_recipe("debug", ["parallel.tp=2", "parallel.tp_sequence_sharding=true",
                              "train.seq_len=63", "train.global_batch_tokens=252"], world_size=2)
    assert info.value.key == "parallel.tp_sequence_sharding" and "63 / 1 = 63" in str(info.value)
    assert load_recipe("debug", ["parallel.tp=2", "parallel.tp_sequence_sharding=true"],
                       world_size=2).parallel.tp_sequence_sharding
