"""Forward+backward throughput of `memory_scan` against this machine's fp32 matmul peak.

    .venv/bin/python benchmarks/memory_scan.py [--batch 2 --heads 4 --seq-len 2048 --dim 64 ...]

    .venv/bin/python benchmarks/memory_scan.py --ab cpp fused   # alternating A/B of two implementations
    .venv/bin/python benchmarks/memory_scan.py --calls 8        # the sequence as 8 chained calls, as MAC's segments
    .venv/bin/python benchmarks/memory_scan.py --base HEAD~1 --ab cpp base:cpp   # this tree's kernel against a commit's

`--base COMMIT` makes the `kernels/` folder of that commit (git archive into a temporary package,
its C++ extension built into torch's cache under its own digest, ~1 minute the first time)
available to `--ab` as `base:IMPLEMENTATION`: a kernel change measured against its parent in one
process, turn by turn, where separate runs on a shared machine differ by more than the change.

Prints tokens/s (B*T tokens per forward+backward), achieved GFLOP/s from `scan_flops`, that as a
fraction of the GFLOP/s of a large fp32 torch.matmul timed alternately with it in the same process
with the same thread count, the peak memory of one step, and the speed-up over the token-by-token oracle
at a small size. Medians of --repeats timed runs after warm-up; the CPU may be shared, so run it
a few times.
"""

from __future__ import annotations

import argparse
import atexit
import functools
import importlib
import io
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

from titans_train.kernels import memory_scan, memory_scan_sequential


def scan_flops(
    batch: int, heads: int, seq_len: int, widths: list[int], chunk_size: int, retrieve: str
) -> int:
    """Matmul FLOPs (2 per multiply-add) of one forward+backward of the chunked algorithm.

    widths: [d, hidden, ..., d], layer l maps widths[l] -> widths[l + 1]. Per (batch, head) and
    chunk of n tokens, the forward does: the store pass at the chunk-start weights (one product
    per layer) and the error backpropagation (one per layer but the first); token retrieval per
    layer: h W^T, h S^T, the (n x n) scores h a^T and scores @ delta; chunk retrieval: one product
    per layer; the new weights and momentum: two (d_out x n) @ (n x d_in) per layer. The backward of
    a product costs two products, so the total is 3x the forward. Elementwise work is not counted,
    nor the decay matrix C = D_alpha D_eta: `fused` forms it as an (n x n) @ (n x n) product, the C++
    gate op (cpu/gates.cpp) by an O(n^2) recurrence, so it is not work the algorithm needs.
    """
    layers = list(zip(widths[:-1], widths[1:]))
    total = 0
    for start in range(0, seq_len, chunk_size):
        n = min(chunk_size, seq_len - start)
        forward = sum(2 * n * d_in * d_out for d_in, d_out in layers)  # store pass
        forward += sum(2 * n * d_in * d_out for d_in, d_out in layers[1:])  # errors
        if retrieve == "token":
            forward += sum(4 * n * d_in * d_out + 2 * n * n * (d_in + d_out) for d_in, d_out in layers)
        else:
            forward += sum(2 * n * d_in * d_out for d_in, d_out in layers)
        forward += sum(4 * n * d_in * d_out for d_in, d_out in layers)  # weights and momentum
        total += 3 * forward
    return batch * heads * total


def make_inputs(batch, heads, seq_len, dim, widths, requires_grad=True):
    """Unit-norm q, k; v a fixed linear map of k (something to memorise); gates near a model's init,
    with inner learning rates theta ~ U(0, 0.03): larger ones (0.1) make the inner gradient descent
    of this depth-2, hidden-256 memory diverge to NaN within 512 tokens.

    With v unrelated to k and strong forgetting, a depth >= 2 memory decays towards its zero fixed
    point (both layers' gradients vanish there) and the arithmetic runs into subnormal numbers,
    which are 5-10x slower on x86: see --flush-denormal.
    """

    def leaf(x):
        return x.requires_grad_(requires_grad)

    q = leaf(torch.nn.functional.normalize(torch.randn(batch, heads, seq_len, dim), dim=-1))
    k = torch.nn.functional.normalize(torch.randn(batch, heads, seq_len, dim), dim=-1)
    v = leaf(k @ torch.randn(heads, dim, dim) + 0.1 * torch.randn(batch, heads, seq_len, dim))
    k = leaf(k)
    theta = leaf(0.03 * torch.rand(batch, heads, seq_len))
    eta = leaf(0.5 + 0.5 * torch.rand(batch, heads, seq_len))
    alpha = leaf(0.02 * torch.rand(batch, heads, seq_len))
    weights = tuple(
        leaf(torch.randn(batch, heads, d_out, d_in) / d_in**0.5) for d_in, d_out in zip(widths[:-1], widths[1:])
    )
    momentum = tuple(leaf(torch.zeros_like(w)) for w in weights)
    return (q, k, v, theta, eta, alpha, weights, momentum)


BASE_PREFIX = "base:"


def base_memory_scan(commit: str):
    """`memory_scan` of the `kernels/` folder at `commit`, imported from a temporary copy as its own
    package (removed at exit), beside this tree's."""
    root = Path(__file__).resolve().parents[1]
    archive = subprocess.run(["git", "-C", str(root), "archive", commit, "kernels"], capture_output=True)
    if archive.returncode:
        raise SystemExit(f"--base {commit}: git archive failed: {archive.stderr.decode().strip()}; "
                         "give a commit of this repository's history")
    directory = Path(tempfile.mkdtemp(prefix="memory_scan_base_"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as files:
        files.extractall(directory, filter="data")
    package = "memory_scan_base_kernels"  # its imports are relative: any package name serves
    (directory / "kernels").rename(directory / package)
    sys.path.insert(0, str(directory))
    return importlib.import_module(f"{package}.memory_scan.scan").memory_scan


def chained(n_calls, scan_function=memory_scan):
    """`scan_function` over T as n_calls consecutive pieces, each starting from the state the one before
    ended with (what MAC does per segment): the same numbers as one call, plus each call's fixed cost."""
    def scan(q, k, v, theta, eta, alpha, weights, momentum, **options):
        length = q.shape[2] // n_calls  # main() checks that T splits into whole chunks
        outputs, state = [], (weights, momentum)
        for pieces in zip(*(x.split(length, dim=2) for x in (q, k, v, theta, eta, alpha))):
            y, state = scan_function(*pieces, *state, **options)
            outputs.append(y)
        return torch.cat(outputs, dim=2), state
    return scan_function if n_calls == 1 else scan


def forward_backward(scan, inputs, options):
    y, (weights_out, momentum_out) = scan(*inputs, **options)
    loss = y.square().sum() + sum(w.square().sum() for w in weights_out) + sum(s.sum() for s in momentum_out)
    if not torch.isfinite(loss):  # a diverging inner recurrence would time NaN arithmetic
        raise RuntimeError(f"non-finite loss {loss.item()} in the benchmark step: the inputs make the memory diverge")
    loss.backward()


def seconds(step):
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def median_seconds(step, repeats, warmup):
    for _ in range(warmup):
        step()
    return statistics.median(seconds(step) for _ in range(repeats))


def interleaved_gflops(step, step_flops, repeats, warmup, matmul_size=2048):
    """Median GFLOP/s of `step` and of a large fp32 matmul, timed alternately, and the median of
    the per-pair ratios: on a shared machine the load drifts, and a pair sees about the same load."""
    a, b = torch.randn(matmul_size, matmul_size), torch.randn(matmul_size, matmul_size)
    matmul_flops = 2 * matmul_size**3

    def matmul():
        a @ b

    for _ in range(warmup):
        step()
        matmul()
    step_rates, matmul_rates = [], []
    for _ in range(repeats):
        step_rates.append(step_flops / seconds(step) / 1e9)
        matmul_rates.append(matmul_flops / seconds(matmul) / 1e9)
    ratios = [s / m for s, m in zip(step_rates, matmul_rates)]
    return statistics.median(step_rates), statistics.median(matmul_rates), statistics.median(ratios)


def alternating_ab(steps: dict, repeats: int, warmup: int):
    """Median seconds of each step, timed in turns (A, B, A, B, ...), and the median of the per-turn
    ratios first / other: each pair runs under about the same machine load."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            times[name].append(seconds(step))
    first, *others = steps
    ratios = {other: statistics.median(a / b for a, b in zip(times[first], times[other])) for other in others}
    return {name: statistics.median(values) for name, values in times.items()}, ratios


def print_ab(args, inputs, options):
    names = args.ab
    base_scan = base_memory_scan(args.base) if args.base else None
    steps = {}
    for name in names:
        implementation = name.removeprefix(BASE_PREFIX)
        scan = chained(args.calls, base_scan if name.startswith(BASE_PREFIX) else memory_scan)
        steps[name] = functools.partial(forward_backward, scan, inputs, dict(options, implementation=implementation))
    if args.base:
        print(f"base: kernels/ at {args.base}")
    medians, ratios = alternating_ab(steps, args.repeats, args.warmup)
    print(f"alternating A/B, forward+backward, threads={torch.get_num_threads()}, median of {args.repeats} turns:")
    for name in names:
        print(f"  {name:9s} {medians[name] * 1e3:9.1f} ms")
    for other, ratio in ratios.items():
        print(f"  {names[0]} / {other} time ratio {ratio:.3f} (median of per-turn ratios; < 1: {names[0]} is faster)")


def max_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--expansion", type=int, default=4)
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--retrieve", choices=("token", "chunk"), default="token")
    parser.add_argument("--activation", choices=("silu", "gelu"), default="silu")
    parser.add_argument("--surprise-bound", type=float, default=0.0,
                        help="memory_scan's surprise_bound (0: none; the bound's extra work per chunk is elementwise)")
    implementations = ("fused", "autograd", "cpp")
    parser.add_argument("--implementation", choices=implementations, default="fused")
    parser.add_argument("--ab", nargs="+", metavar="IMPLEMENTATION",
                        choices=(*implementations, *(BASE_PREFIX + name for name in implementations)),
                        help="only an alternating A/B of these implementations (e.g. --ab cpp fused; "
                             "base:cpp with --base)")
    parser.add_argument("--base", metavar="COMMIT",
                        help="for --ab's base:IMPLEMENTATION names: the kernels/ folder at this git commit")
    parser.add_argument("--calls", type=int, default=1,
                        help="run T as this many chained calls (MAC: seq_len / segment_len); the oracle line is one call")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--oracle-seq-len", type=int, default=128, help="T of the oracle comparison")
    parser.add_argument(
        "--flush-denormal", action="store_true", help="torch.set_flush_denormal(True) before anything runs"
    )
    args = parser.parse_args()
    if args.ab and any(name.startswith(BASE_PREFIX) for name in args.ab) != bool(args.base):
        parser.error("--ab base:IMPLEMENTATION and --base COMMIT go together (base: names the commit's kernels)")
    if args.base and not args.ab:
        parser.error("--base COMMIT only serves --ab (e.g. --base HEAD~1 --ab cpp base:cpp)")
    if args.calls < 1 or args.seq_len % (args.calls * args.chunk_size):
        parser.error(f"--calls {args.calls}: --seq-len {args.seq_len} must split into that many pieces of whole "
                     f"chunks (--chunk-size {args.chunk_size}), so the chunks and FLOPs are one call's")
    # Before the first parallel region, so the intra-op worker threads inherit the flag.
    torch.set_flush_denormal(args.flush_denormal)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    widths = [args.dim] + [args.dim * args.expansion] * (args.depth - 1) + [args.dim]
    options = dict(
        chunk_size=args.chunk_size, retrieve=args.retrieve, activation=args.activation, residual=True,
        surprise_bound=args.surprise_bound, implementation=args.implementation,
    )

    inputs = make_inputs(args.batch, args.heads, args.seq_len, args.dim, widths)
    if args.ab:
        print_ab(args, inputs, options)
        return
    # Peak memory first: ru_maxrss is a high-water mark, so the step must run before anything larger.
    rss_before = max_rss_mib()
    scan = chained(args.calls)
    forward_backward(scan, inputs, options)
    step_peak_mib = max_rss_mib() - rss_before

    flops = scan_flops(args.batch, args.heads, args.seq_len, widths, args.chunk_size, args.retrieve)
    achieved, peak, fraction = interleaved_gflops(
        lambda: forward_backward(scan, inputs, options), flops, args.repeats, args.warmup
    )
    step_seconds = flops / achieved / 1e9

    small = make_inputs(args.batch, args.heads, args.oracle_seq_len, args.dim, widths)
    small_options = dict(options, chunk_size=min(args.chunk_size, args.oracle_seq_len))
    oracle_options = {name: x for name, x in small_options.items() if name != "implementation"}
    oracle_seconds = median_seconds(lambda: forward_backward(memory_scan_sequential, small, oracle_options), 3, 1)
    chunked_seconds = median_seconds(lambda: forward_backward(memory_scan, small, small_options), 5, 1)

    tokens = args.batch * args.seq_len
    print(
        f"memory_scan fwd+bwd  B={args.batch} H={args.heads} T={args.seq_len} d={args.dim} "
        f"depth={args.depth} hidden={widths[1] if args.depth > 1 else args.dim} "
        f"chunk={args.chunk_size} retrieve={args.retrieve} {args.implementation} threads={torch.get_num_threads()}"
        f"{f' calls={args.calls}' if args.calls > 1 else ''}"
        f"{f' surprise_bound={args.surprise_bound:g}' if args.surprise_bound else ''}"
        f"{' flush-denormal' if args.flush_denormal else ''}"
    )
    print(f"  time per step       {step_seconds * 1e3:9.1f} ms (median of {args.repeats})")
    print(f"  tokens/s            {tokens / step_seconds:9.0f}")
    print(f"  analytic GFLOP      {flops / 1e9:9.2f}")
    print(f"  achieved GFLOP/s    {achieved:9.1f}")
    print(f"  matmul peak GFLOP/s {peak:9.1f} (2048^3 fp32 torch.matmul, timed alternately, median)")
    print(f"  fraction of peak    {fraction:9.1%} (median of the per-pair ratios)")
    print(f"  step peak memory    {step_peak_mib:9.1f} MiB (ru_maxrss delta over the first step)")
    print(
        f"  oracle T={args.oracle_seq_len}: {oracle_seconds * 1e3:.1f} ms, chunked {chunked_seconds * 1e3:.1f} ms, "
        f"speed-up {oracle_seconds / chunked_seconds:.1f}x"
    )


if __name__ == "__main__":
    main()
