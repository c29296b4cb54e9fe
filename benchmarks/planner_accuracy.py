"""The planner's peak-memory prediction against the measured peak, on CPU.

    .venv/bin/python benchmarks/planner_accuracy.py            # the table of docs/BENCHMARKS.md
    .venv/bin/python benchmarks/planner_accuracy.py --quick    # two configurations

Each configuration runs in a fresh subprocess (one process, fp32, the training forward through
the model's layer-level API as the trainer drives it, with or without per-layer activation
checkpointing, backward, `torch.optim.AdamW(foreach=False)` as the trainer builds it, 2 steps).
Measured: the bytes in use by the C allocator (glibc `mallinfo2`: `uordblks + hblkhd`, which is
where torch's CPU tensors live) minus the same just before the model is built, sampled whenever
autograd saves or unpacks a tensor, after every module's forward (recomputations included)
and after every forward, backward and optimizer step; the
maximum over the samples is the measured peak. The resident set is not used: it also grows by
the pages of torch's library code that a first step faults in (~160 MiB for any model here). Predicted: `titans_train.plan.evaluate` for the same model, batch and
precision at tp = sp = dp = 1, ZeRO-0 (what a plain optimizer holds). The measured column has
the libraries' fixed first-step allocations (oneDNN scratch, autograd engine, Python objects:
~27 MiB) subtracted, measured the same way with a 1-layer, dim-32, vocab-256 model of the same
variant and the same checkpointing (its own prediction, < 6 MiB, added back).
Memory is measurable under load (it does not depend on speed); these runs say nothing about time.
ZeRO stages and tp/sp layouts under DeepSpeed on several processes are not measured here
(docs/scaling.md, "What is checked").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

BENCHMARKS = os.path.dirname(os.path.abspath(__file__))
CONFIGS = [  # (variant, dim, layers, heads, vocab, batch, seq_len)
    ("transformer", 256, 4, 4, 8192, 4, 512),
    ("lmm", 256, 4, 4, 8192, 2, 512),
    ("mac", 256, 4, 4, 8192, 2, 512),
    ("mag", 384, 3, 6, 8192, 2, 512),
    ("mal", 256, 4, 4, 8192, 2, 512),
]


def model_config(variant, dim, layers, heads, vocab):
    from titans_train.model import TitansConfig

    return TitansConfig(variant=variant, vocab_size=vocab, dim=dim, n_layers=layers, n_heads=heads,
                        chunk_size=64, segment_len=128, window=128)


def measure(variant, dim, layers, heads, vocab, batch, seq_len, checkpointing) -> int:
    """In this (fresh) process: peak RSS growth in bytes over 2 training steps."""
    import ctypes

    import torch
    from activation_memory import forward_loss  # the trainer's forward, as benchmarked there

    from titans_train.model import TitansLM

    torch.manual_seed(0)
    tokens = torch.randint(0, vocab, (batch, seq_len + 1))
    config = model_config(variant, dim, layers, heads, vocab)

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
            "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    peak = [0]

    def sample(value=None):
        info = libc.mallinfo2()
        peak[0] = max(peak[0], info.uordblks + info.hblkhd)
        return value

    sample()
    before = peak[0]
    model = TitansLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
    hooks = torch.autograd.graph.saved_tensors_hooks(sample, sample)
    for module in model.modules():  # also samples a checkpointed layer's recompute in backward
        module.register_forward_hook(lambda module, args, output: sample())
    for _ in range(2):
        hooks.__enter__()
        loss = forward_loss(model, tokens, checkpointing)
        sample()
        loss.backward()
        sample()
        hooks.__exit__(None, None, None)
        optimizer.step()
        sample()
        optimizer.zero_grad(set_to_none=True)
    return peak[0] - before


def predict(variant, dim, layers, heads, vocab, batch, seq_len, checkpointing) -> dict:
    from titans_train.plan import DEVICES, Hardware, Layout, RunShape, evaluate

    run = RunShape(model_config(variant, dim, layers, heads, vocab), seq_len, batch * seq_len, batch * seq_len, "fp32")
    plan = evaluate(run, Hardware(DEVICES["h100-80gb"], 1, 1),
                    Layout(zero_stage=0, micro_batch=batch, activation_checkpointing=checkpointing))
    return {"peak": plan.peak_bytes, "terms": {t.name: t.value for t in plan.memory}}


def measure_in_subprocess(case, checkpointing) -> int:
    code = (f"import json, sys; sys.path.insert(0, {BENCHMARKS!r}); "
            f"from planner_accuracy import measure; print(json.dumps(measure(*{list(case)!r}, {checkpointing})))")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def floor_case(case):
    variant, *_ = case
    return (variant, 32, 1, 2, 256, 1, 128)


def measured_peak(case, checkpointing) -> float:
    """Measured peak minus the libraries' fixed first-step allocations (see the docstring)."""
    floor = floor_case(case)
    fixed = measure_in_subprocess(floor, checkpointing) - predict(*floor, checkpointing)["peak"]
    return measure_in_subprocess(case, checkpointing) - fixed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    cases = CONFIGS[:2] if args.quick else CONFIGS
    print("| variant | dim x layers | batch x seq | checkpointing | predicted MiB | measured MiB | predicted / measured |")
    print("|---|---|---|---|---|---|---|")
    for case in cases:
        for checkpointing in (False, True):
            predicted = predict(*case, checkpointing)["peak"]
            measured = measured_peak(case, checkpointing)
            variant, dim, layers, _, _, batch, seq_len = case
            print(f"| {variant} | {dim} x {layers} | {batch} x {seq_len} | {'on' if checkpointing else 'off'} | "
                  f"{predicted / 2**20:.1f} | {measured / 2**20:.1f} | {predicted / measured:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
