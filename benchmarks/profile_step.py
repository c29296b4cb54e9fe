"""Where one training step's time goes, per region of the model, for one variant.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/profile_step.py --variant mac
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/profile_step.py --variant lmm --steps 2 --top-ops 20

The step is `model_step.py`'s (forward, cross-entropy, backward, AdamW; same model flags and
defaults, ~10M parameters), profiled with torch.profiler after warm-up. Regions: every submodule's
forward runs inside a `record_function` named by its path with the layer index dropped (the layers
add up), and the memory kernel is split into `memory_scan.gates` (the gate products: `stacked_gates`,
or `cpp_stacked_gates` for `cpp`) and `memory_scan.kernel` (the chunk loop). Each op's self time
goes to the innermost region open when it ran, so a module's own row is what it does outside its
submodules (for a mixer: segment handling and state plumbing). A backward op goes to the region of
the forward op that made its autograd node (matched by sequence number); gradient accumulation into
parameters and the engine's own time get rows of their own. Shares are of the profiled steps' total
op time; the profiler's per-op overhead inflates regions made of many small ops, so compare shares
between runs of this script, not with model_step.py's wall-clock times.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_step import add_model_arguments, build_config, make_optimizer  # noqa: E402

from titans_train.kernels.memory_scan import fused  # noqa: E402
from titans_train.kernels.memory_scan.cpu import scan as cpp_scan_module  # noqa: E402
from titans_train.model import VARIANTS, TitansLM  # noqa: E402
from titans_train.model import memory as memory_module  # noqa: E402

REGION_PREFIX = "region:"
CHUNK_LOOPS = ((fused, "FusedChunkedScan"), (cpp_scan_module, "CppChunkedScan"))
GATE_PRODUCTS = ((fused, "stacked_gates"), (cpp_scan_module, "cpp_stacked_gates"))
LAYER_INDEX = re.compile(r"^layers\.\d+(\.|$)")
BACKWARD_PREFIX = "autograd::engine::evaluate_function: "
GRADIENT_ACCUMULATION = "backward: gradient accumulation"
ENGINE = "backward: engine and unattributed"


def region_name(path: str) -> str:
    """'layers.3.mixer.memory.q_proj' -> 'mixer.memory.q_proj', 'layers.3' -> 'block' (the layers add up)."""
    return LAYER_INDEX.sub("", path) or "block"


def open_regions(model: torch.nn.Module) -> list:
    """Hooks that wrap every submodule's forward in a record_function region."""
    handles = []
    for path, module in model.named_modules():
        if not path:
            continue
        name = REGION_PREFIX + region_name(path)

        def enter(module, args, name=name):
            module._profile_region = record_function(name)
            module._profile_region.__enter__()

        def leave(module, args, output):
            module._profile_region.__exit__(None, None, None)

        handles.append(module.register_forward_pre_hook(enter))
        handles.append(module.register_forward_hook(leave))
    return handles


@contextlib.contextmanager
def kernel_regions():
    """memory_scan and its gate products as regions of their own, for the duration of the profile
    (the chunk loop and gate products of both CPU kernels, `fused` and `cpp`: whichever `auto` runs)."""
    scan = memory_module.memory_scan
    chunk_loops = {module: getattr(module, name) for module, name in CHUNK_LOOPS}
    gate_products = {module: getattr(module, name) for module, name in GATE_PRODUCTS}

    def traced(function, name):
        def wrapper(*args, **kwargs):
            with record_function(REGION_PREFIX + name):
                return function(*args, **kwargs)
        return wrapper

    def traced_loop(chunk_loop):
        class TracedChunkLoop:
            apply = staticmethod(traced(chunk_loop.apply, "memory_scan.kernel"))
        return TracedChunkLoop

    memory_module.memory_scan = traced(scan, "memory_scan")
    for module, name in GATE_PRODUCTS:
        setattr(module, name, traced(gate_products[module], "memory_scan.gates"))
    for module, name in CHUNK_LOOPS:
        setattr(module, name, traced_loop(chunk_loops[module]))
    try:
        yield
    finally:
        memory_module.memory_scan = scan
        for module, name in GATE_PRODUCTS:
            setattr(module, name, gate_products[module])
        for module, name in CHUNK_LOOPS:
            setattr(module, name, chunk_loops[module])


def training_step(model, optimizer, tokens) -> None:
    with record_function(REGION_PREFIX + "forward: model"):
        logits = model(tokens[:, :-1]).logits
    with record_function(REGION_PREFIX + "loss"):
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    with record_function(REGION_PREFIX + "optimizer"):
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def innermost_region(event) -> str | None:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith(REGION_PREFIX):
            return parent.name[len(REGION_PREFIX):]
        parent = parent.cpu_parent
    return None


def attribute(events) -> collections.Counter:
    """Self time (us) keyed by (region, "fwd" or "bwd", op name)."""
    times = collections.Counter()
    region_of_sequence = {}
    in_backward = []
    for event in events:
        if event.name.startswith(REGION_PREFIX):
            continue
        backward_root = _backward_root(event)
        if backward_root is None:
            region = innermost_region(event) or "unattributed"
            times[region, "fwd", event.name] += event.self_cpu_time_total
            if event.sequence_nr >= 0:  # it made an autograd node (inner ops share its region)
                region_of_sequence.setdefault((event.thread, event.sequence_nr), region)
        else:
            in_backward.append((event, backward_root))
    for event, root in in_backward:
        if root.name.startswith(BACKWARD_PREFIX + "torch::autograd::AccumulateGrad"):
            region = GRADIENT_ACCUMULATION
        elif root.name.startswith(BACKWARD_PREFIX):
            region = region_of_sequence.get((root.fwd_thread, root.sequence_nr), ENGINE)
        else:
            region = ENGINE
        times[region, "bwd", event.name] += event.self_cpu_time_total
    return times


def _backward_root(event):
    """The outermost evaluate_function (or other autograd-engine range) above `event`, None in forward."""
    root, node = None, event
    while node is not None:
        if node.name.startswith("autograd::engine"):
            root = node
        node = node.cpu_parent
    return root


def report(times: collections.Counter, steps: int, top_ops: int, region_ops: int) -> None:
    """Per-region shares, the top ops of the largest regions, and the top ops overall."""
    total = sum(times.values())
    by_region, by_op, ops_of_region = collections.Counter(), collections.Counter(), {}
    phase_of_region = collections.Counter()
    for (region, phase, op), time_us in times.items():
        by_region[region] += time_us
        phase_of_region[region, phase] += time_us
        by_op[op] += time_us
        ops_of_region.setdefault(region, collections.Counter())[f"{phase} {op}"] += time_us

    def percent(time_us):
        return 100 * time_us / total

    print(f"{'region':<40} {'fwd %':>6} {'bwd %':>6} {'total %':>8} {'ms/step':>8}")
    for region, time_us in by_region.most_common():
        print(f"{region:<40} {percent(phase_of_region[region, 'fwd']):>6.1f} "
              f"{percent(phase_of_region[region, 'bwd']):>6.1f} {percent(time_us):>8.1f} {time_us / 1e3 / steps:>8.1f}")
    forward = sum(t for (_, phase, _), t in times.items() if phase == "fwd")
    print(f"{'all':<40} {percent(forward):>6.1f} {percent(total - forward):>6.1f} {100.0:>8.1f} "
          f"{total / 1e3 / steps:>8.1f}")
    for region, _ in by_region.most_common(region_ops):
        print(f"\n{region}: top ops (% of all)")
        for op, time_us in ops_of_region[region].most_common(8):
            print(f"  {op:<62} {percent(time_us):>6.1f}")
    if top_ops:
        print(f"\ntop {top_ops} ops by self time (% of all)")
        for op, time_us in by_op.most_common(top_ops):
            print(f"  {op:<62} {percent(time_us):>6.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="mac", choices=VARIANTS)
    add_model_arguments(parser)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=1, help="profiled steps")
    parser.add_argument("--top-ops", type=int, default=15, help="ops listed by total self time")
    parser.add_argument("--region-ops", type=int, default=6, help="regions whose top ops are listed")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = TitansLM(build_config(args.variant, args))
    optimizer = make_optimizer(model)
    generator = torch.Generator().manual_seed(0)

    def tokens():
        return torch.randint(0, args.vocab_size, (args.batch, args.seq_len + 1), generator=generator)

    for _ in range(args.warmup):
        training_step(model, optimizer, tokens())
    handles = open_regions(model)
    with kernel_regions(), profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            training_step(model, optimizer, tokens())
    for handle in handles:
        handle.remove()
    print(f"variant {args.variant}, torch {torch.__version__}, {args.threads} threads, batch {args.batch} x "
          f"T {args.seq_len}, dim {args.dim}, {args.n_layers} layers, {args.steps} profiled steps")
    report(attribute(prof.events()), args.steps, args.top_ops, args.region_ops)


if __name__ == "__main__":
    main()
