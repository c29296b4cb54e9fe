"""Every (tp, sp, dp, ZeRO) layout gives the single-process loss and gradients, for every variant.

Each rank builds the same tiny model from the same seed and computes the single-process
reference on the whole global batch itself, then shards a copy for its layout and runs the
parallel step on its part of the batch; the children return the relative errors and the parent
asserts them, so a failure names the layout, the variant and the worst parameter.

Relative error of a tensor: max |parallel - reference| / max |reference| (fp32 throughout).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from distributed import run_distributed
from titans_train.model import VARIANTS, TitansConfig, TitansLM
from titans_train.parallel import ParallelContext
from titans_train.config.schema import ParallelConfig
from titans_train.parallel.parallelize import ParallelObjective, parallel_loss, parallelize
from titans_train.parallel.sequence_parallel import average_gradients
from titans_train.parallel.tensor_parallel import gather_full_gradients, unshard
from titans_train.parallel.zero import deepspeed_batch_settings, initialize_engine, optimizer_step
from titans_train.train.checkpoint import assign_checkpoint_writers

TOLERANCE = 1e-5
VOCAB = 70  # not a multiple of tp = 2 or 4: exercises the vocabulary padding
SEQ_LEN = 32  # sp = 4 spans of 8 = one MAC segment = two memory chunks
MICRO_BATCH = 2
CLIP = 0.5  # below the gradient norms of these runs (~0.7-0.9): clipping really happens


def tiny_config(variant: str) -> TitansConfig:
    return TitansConfig(variant=variant, vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4,
                        chunk_size=4, segment_len=8, window=8, n_persistent=2, memory_depth=2,
                        memory_expansion=2, tie_embeddings=variant != "swa")


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value - reference).abs().max() / reference.abs().max().clamp_min(1e-30)).item()


def worst(values: dict[str, torch.Tensor], references: dict[str, torch.Tensor]) -> tuple[float, str]:
    assert values.keys() == references.keys()
    return max((relative_error(values[name], references[name]), name) for name in references)


def global_batch(seed: int, samples: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (samples, SEQ_LEN + 1), generator=generator)


def reference_loss(model: TitansLM, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1]).logits  # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())


def check_plain_layouts(layouts):
    """(tp, sp, activation checkpointing) layouts, gradients averaged by `average_gradients`."""
    records = []
    for tp, sp, activation_checkpointing in layouts:
        context = ParallelContext.initialize(tp=tp, sp=sp)
        for variant in VARIANTS:
            torch.manual_seed(0)
            model = TitansLM(tiny_config(variant))
            reference = copy.deepcopy(model)
            tokens = global_batch(seed=1, samples=MICRO_BATCH * context.layout.dp)
            expected_loss = reference_loss(reference, tokens)
            expected_loss.backward()
            expected_grads = {name: p.grad for name, p in reference.named_parameters()}

            plan = parallelize(model, ParallelConfig(activation_checkpointing=activation_checkpointing), context)
            step = parallel_loss(model, tokens.chunk(context.layout.dp)[context.data_rank], plan)
            step.objective.backward()
            step.relay.finish()
            average_gradients(model, context)
            grad_error, grad_name = worst(gather_full_gradients(model, context), expected_grads)
            # evaluation path: no autograd through the relay, telemetry from every layer
            with torch.no_grad():
                evaluation = parallel_loss(model, tokens.chunk(context.layout.dp)[context.data_rank],
                                           plan, return_telemetry=True)
                evaluation.relay.finish()
                expected_telemetry = reference(tokens.chunk(context.layout.dp)[context.data_rank][:, :-1],
                                               return_telemetry=True).telemetry
            layout = f"tp={tp} sp={sp} dp={context.layout.dp}" + " ckpt" * activation_checkpointing
            # Gate means are means over heads and tokens: the replica's, whatever the layout. The
            # update norm and the store gains are per span under sp (replica_telemetry),
            # comparable only at sp = 1.
            per_span = ("update_norm", "store_gain", "store_gain_shuffled")
            comparable = [key for key in expected_telemetry
                          if context.sp_size == 1 or key.rsplit(".", 1)[1] not in per_span]
            records.append(dict(layout=layout, variant=variant,
                                loss_error=max(relative_error(step.loss, expected_loss.detach()),
                                               relative_error(evaluation.loss, expected_loss.detach())),
                                grad_error=grad_error, grad_name=grad_name,
                                telemetry_keys=(sorted(evaluation.telemetry), sorted(expected_telemetry)),
                                telemetry_error=max((relative_error(evaluation.telemetry[key],
                                                                    expected_telemetry[key])
                                                     for key in comparable), default=0.0)))
    ParallelContext.destroy()
    return records


def check_bf16_layouts(layouts):
    """bf16 weights and activations through tp and the relay: the loss stays within bf16
    round-off of the fp32 single-process loss and every gradient is finite and bf16."""
    records = []
    for tp, sp in layouts:
        context = ParallelContext.initialize(tp=tp, sp=sp)
        for variant in VARIANTS:
            torch.manual_seed(0)
            model = TitansLM(tiny_config(variant))
            tokens = global_batch(seed=1, samples=MICRO_BATCH)
            with torch.no_grad():
                expected_loss = reference_loss(model, tokens)
            plan = parallelize(model.to(torch.bfloat16), None, context)
            step = parallel_loss(model, tokens, plan)
            step.objective.backward()
            step.relay.finish()
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            records.append(dict(layout=f"bf16 tp={tp} sp={sp}", variant=variant,
                                loss_error=relative_error(step.loss, expected_loss),
                                grads_finite=all(torch.isfinite(g).all().item() for g in grads),
                                grads_bf16=all(g.dtype == torch.bfloat16 for g in grads)))
    ParallelContext.destroy()
    return records


def check_plain_and_bf16_layouts(layouts, bf16_layouts):
    return check_plain_layouts(layouts), check_bf16_layouts(bf16_layouts)


def _deepspeed():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # skip a ~40 s JIT build
    return deepspeed


def _optimizer(parameters):
    # eps=1e-3: with the default 1e-8, elements whose gradient is at fp32 round-off level get
    # sign-like Adam updates whose direction is round-off noise, in one process as in four.
    return torch.optim.AdamW(parameters, lr=1e-2, eps=1e-3, weight_decay=0.1, foreach=False)


def build_engine(model, plan, stage, accumulation=1, reduce_bucket_size=None):
    """A DeepSpeed engine around the parallel objective. A small `reduce_bucket_size` makes ZeRO
    reduce gradient buckets during backward, as it does on models larger than the default
    5e8-element bucket."""
    _deepspeed()
    context = plan.context
    objective = ParallelObjective(model, plan)
    config = {
        **deepspeed_batch_settings(context, stage, MICRO_BATCH, accumulation),
        "gradient_clipping": CLIP,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**62,
    }
    if stage == 3:
        config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    if reduce_bucket_size is not None:
        config["zero_optimization"]["reduce_bucket_size"] = reduce_bucket_size
    engine, *_ = initialize_engine(objective, _optimizer(objective.parameters()), config, context)
    assign_checkpoint_writers(engine, context)
    return engine


def check_zero_layouts(layouts, steps=3, variants=VARIANTS, reduce_bucket_size=None):
    """(tp, sp, ZeRO stage, gradient accumulation[, variants instead of `variants`]): the loss of every optimizer step, the
    gradients of the first (later ones are taken at parameters that already differ by round-off
    amplified through Adam) and the parameters after the last."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

    records = []
    for tp, sp, stage, accumulation, *layout_variants in layouts:
        context = ParallelContext.initialize(tp=tp, sp=sp)
        for variant in (layout_variants[0] if layout_variants else variants):
            torch.manual_seed(0)
            model = TitansLM(tiny_config(variant))
            reference = copy.deepcopy(model)
            reference_optimizer = _optimizer(reference.parameters())
            plan = parallelize(model, None, context)
            engine = build_engine(model, plan, stage, accumulation, reduce_bucket_size)
            loss_error = grad_error = 0.0
            grad_name = ""
            for step_index in range(steps):
                samples = MICRO_BATCH * accumulation * context.layout.dp
                tokens = global_batch(seed=100 + step_index, samples=samples)
                reference_optimizer.zero_grad()
                expected_loss = reference_loss(reference, tokens)
                expected_loss.backward()
                expected_grads = {name: p.grad.clone() for name, p in reference.named_parameters()}
                torch.nn.utils.clip_grad_norm_(reference.parameters(), CLIP)
                reference_optimizer.step()

                replica_tokens = tokens.chunk(context.layout.dp)[context.data_rank]

                def compare_gradients():
                    nonlocal grad_error, grad_name
                    if step_index == 0:  # where both runs stand at the same parameters
                        local_grads = {name: safe_get_full_grad(p) for name, p in model.named_parameters()}
                        grad_error, grad_name = worst(unshard(model, context, local_grads), expected_grads)

                outcome = optimizer_step(engine, plan, replica_tokens.chunk(accumulation),
                                         inspect_gradients=compare_gradients)
                # the mean of the micro-batches' losses: equal token counts per micro-batch
                loss_error = max(loss_error, relative_error(torch.tensor(outcome.loss), expected_loss.detach()))
            local_params = {name: safe_get_full_fp32_param(p) if stage else p.detach()
                            for name, p in model.named_parameters()}
            param_error, param_name = worst(
                unshard(model, context, local_params),
                {name: p.detach() for name, p in reference.named_parameters()})
            layout = f"tp={tp} sp={sp} dp={context.layout.dp} zero={stage} accumulation={accumulation}"
            records.append(dict(layout=layout,
                                variant=variant, loss_error=loss_error, grad_error=grad_error,
                                grad_name=grad_name, param_error=param_error, param_name=param_name))
            engine.destroy()
    ParallelContext.destroy()
    return records


def check_resume(tp, sp, stage, directory, variant="mac"):
    """Train 2 steps, save, train 2 more; a fresh engine loading the save repeats those 2 exactly."""
    context = ParallelContext.initialize(tp=tp, sp=sp)

    def fresh_engine(seed):
        torch.manual_seed(seed)
        model = TitansLM(tiny_config(variant))
        return build_engine(model, parallelize(model, None, context), stage)

    def train(engine, first, last):
        losses = []
        for step_index in range(first, last):
            tokens = global_batch(seed=200 + step_index, samples=MICRO_BATCH * context.layout.dp)
            outcome = optimizer_step(engine, engine.module.plan, [tokens.chunk(context.layout.dp)[context.data_rank]])
            losses.append(outcome.loss)
        return losses

    engine = fresh_engine(seed=0)
    train(engine, 0, 2)
    engine.save_checkpoint(directory, tag="step2")
    continued = train(engine, 2, 4)
    engine.destroy()
    resumed_engine = fresh_engine(seed=1)  # different initial weights: the load must replace them
    resumed_engine.load_checkpoint(directory, tag="step2")
    resumed = train(resumed_engine, 2, 4)
    dist.barrier()
    ParallelContext.destroy()
    return continued, resumed


def assert_records(records):
    for record in records:
        if "telemetry_keys" in record:
            got, expected = record["telemetry_keys"]
            assert got == expected, record
    failures = [r for r in records if max(r["loss_error"], r["grad_error"], r.get("param_error", 0.0),
                                          r.get("telemetry_error", 0.0)) > TOLERANCE]
    assert not failures, "\n".join(str(r) for r in failures)
    for layout in dict.fromkeys(r["layout"] for r in records):  # shown with pytest -s
        rows = [r for r in records if r["layout"] == layout]
        print(f"{layout}: worst relative error over {len(rows)} variants: "
              f"loss {max(r['loss_error'] for r in rows):.1e}, "
              f"gradient {max(r['grad_error'] for r in rows):.1e}"
              + (f", parameters after the steps {max(r['param_error'] for r in rows):.1e}"
                 if "param_error" in rows[0] else ""))


@pytest.mark.slow
def test_tp2_sp2_and_sp2_checkpointed_match_one_process_and_bf16_runs_for_every_variant():
    records, bf16_records = run_distributed(
        check_plain_and_bf16_layouts, world_size=2, timeout_s=180,
        layouts=[(2, 1, False), (1, 2, False), (1, 2, True)], bf16_layouts=[(2, 1), (1, 2)])[0]
    assert len(records) == 3 * len(VARIANTS)
    assert_records(records)
    # The fp32 loss of bf16 weights and activations, against fp32 throughout: measured 2.0e-6 to
    # 2.1e-5 over these layouts and variants (deterministic inputs), so 1e-4 leaves 5x margin;
    # one bf16 ulp (4e-3) would hide a 200x regression.
    assert len(bf16_records) == 2 * len(VARIANTS)
    for record in bf16_records:
        assert record["grads_finite"] and record["grads_bf16"], record
        assert record["loss_error"] < 1e-4, record


@pytest.mark.slow
def test_sp4_and_tp2_sp2_match_one_process_for_every_variant():
    records = run_distributed(check_plain_layouts, world_size=4, timeout_s=200,
                              layouts=[(1, 4, False), (2, 2, False)])[0]
    assert len(records) == 2 * len(VARIANTS)
    assert_records(records)


def check_four_rank_zero_drills(directory):
    """Every four-rank ZeRO drill in one launch (launches cost seconds): the layouts' records and
    the two resumes' (continued, resumed) losses."""
    records = check_zero_layouts([
        (1, 2, 1, 2),  # ZeRO-1 with 2 accumulated micro-batches per optimizer step
        (2, 1, 3, 1),
        (2, 2, 2, 1, ("mac", "mal")),  # tp x sp x ZeRO-2 together, the variants with the most cross-head traffic
        (1, 2, 3, 2),  # ZeRO-3 shards over dp only when sp > 1 (parallel/zero.py)
        (2, 2, 3, 1, ("mac", "mal")),
    ])
    # The sp replicas of a ZeRO-3 shard would write the same files: only sp rank 0 writes them.
    resumes = {f"tp={tp} sp={sp} zero={stage}": check_resume(tp, sp, stage, f"{directory}/tp{tp}-sp{sp}-zero{stage}")
               for tp, sp, stage in ((1, 2, 3), (2, 2, 1))}
    return records, resumes


@pytest.mark.slow
def test_zero_layouts_and_resumes_on_four_ranks_match_one_process(tmp_path):
    results = run_distributed(check_four_rank_zero_drills, world_size=4, timeout_s=900,
                              directory=str(tmp_path / "checkpoint"))
    records, resumes = results[0]
    assert len(records) == 3 * len(VARIANTS) + 2 * 2
    assert_records(records)
    for layout, (continued, resumed) in resumes.items():
        assert resumed == continued, layout  # bit-identical, not approximately
    assert all(result[1] == resumes for result in results)  # every rank logs the same global loss


@pytest.mark.slow
def test_zero_reductions_wait_for_the_sequence_wavefront():
    # A 500-element bucket makes ZeRO-2 reduce during backward, as on any model larger than the
    # default bucket: without deferring the reductions these layouts deadlock (the launch times out).
    records = run_distributed(check_zero_layouts, world_size=2, timeout_s=150,
                              layouts=[(1, 2, 2, 2), (1, 2, 1, 1), (1, 2, 0, 2)], variants=("mac", "lmm"),
                              reduce_bucket_size=500)[0]
    assert len(records) == 3 * 2
    assert_records(records)
