"""The GPU path in one table: Triton memory_scan numerics and speed, and the model step's MFU.

    bash benchmarks/gpu_check.sh                 # one CUDA GPU, under 5 minutes
    bash benchmarks/gpu_check.sh --cpu-smoke     # every piece at tiny size on CPU (Triton interpreted)

Sections (one table, a row per measurement):
- numerics: Triton against the fused PyTorch reference run in fp64 on the same values, for fp32
  and bf16 q/k/v/gates (fp32 state), depth 1 and 2, token and chunk retrieval: the largest
  max|error| / max|reference| over y, the final state and every input gradient, with the bound the
  CPU tests use (1e-4 fp32; 2^-8 bf16 in the interpreter, which computes the products in fp32;
  on GPU bf16 inputs use tf32 products, so a bf16 row may need more: it is reported, not hidden).
- memory_scan speed: forward+backward of Triton and of the reference, tokens/s, TFLOP/s from the
  algorithm's matmul count (`benchmarks/memory_scan.scan_flops`; the Triton backward also
  recomputes the forward, not counted) and the fraction of the device's peak for the precision
  the kernel's products use (fp32 FMA for fp32 inputs, tf32 for bf16 inputs).
- model step: forward+backward+AdamW of one layer stack with the 760M recipes' layer shape
  (dim 1280, 20 heads, T = 4096) under bf16 autocast, MFU from `flops_per_token` against the bf16
  dense peak, for every memory variant and the transformer (their ratio is the number to watch).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

if "--cpu-smoke" in sys.argv:  # read by triton when the kernels are defined (first triton call)
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from memory_scan import make_inputs, scan_flops  # noqa: E402  (benchmarks/memory_scan.py)

from titans_train.kernels import memory_scan  # noqa: E402
from titans_train.model import TitansConfig, TitansLM  # noqa: E402
from titans_train.model.flops import flops_per_token  # noqa: E402

# Dense peak FLOP/s by precision; matched against torch.cuda.get_device_name() (first hit wins).
PEAKS = {
    "H100": {"fp32": 67e12, "tf32": 495e12, "bf16": 989e12},  # SXM; PCIe is ~20% lower: use --peak-*
    "H200": {"fp32": 67e12, "tf32": 495e12, "bf16": 989e12},
    "A100": {"fp32": 19.5e12, "tf32": 156e12, "bf16": 312e12},
}
NUMERICS_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2.0**-8}
MODEL_VARIANTS = ("transformer", "lmm", "mac", "mag", "mal")


def sizes(smoke: bool) -> dict:
    if smoke:
        return dict(numerics=dict(batch=1, heads=2, seq_len=37, dim=16, chunk=16),
                    speed=dict(batch=1, heads=2, seq_len=64, dim=16, chunk=16, depth=2, repeats=1),
                    model=dict(dim=64, n_heads=4, n_layers=1, seq_len=64, chunk=16, segment=32, window=32,
                               batch=1, steps=1, vocab=256))
    return dict(numerics=dict(batch=2, heads=4, seq_len=1000, dim=64, chunk=64),
                speed=dict(batch=8, heads=16, seq_len=4096, dim=64, chunk=64, depth=2, repeats=10),
                model=dict(dim=1280, n_heads=20, n_layers=2, seq_len=4096, chunk=64, segment=512, window=512,
                           batch=1, steps=5, vocab=32000))


def peak(device: torch.device, precision: str, overrides: dict) -> float:
    if overrides.get(precision):
        return overrides[precision] * 1e12
    if device.type != "cuda":
        return float("nan")
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAKS.items():
        if key in name:
            return peaks[precision]
    return float("nan")


def fraction(value, of):
    return "n/a" if of != of else f"{value / of:.1%}"  # of != of: no known peak (NaN)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(step, device, repeats, warmup=1):
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def scan_results(inputs, options, implementation, upstream_seed):
    """y, the final state and every input's gradient for one random upstream gradient."""
    leaves = [x.detach().clone().requires_grad_() for x in (*inputs[:6], *inputs[6], *inputs[7])]
    depth = len(inputs[6])
    y, (weights, momentum) = memory_scan(*leaves[:6], tuple(leaves[6:6 + depth]), tuple(leaves[6 + depth:]),
                                         implementation=implementation, **options)
    outputs = [y, *weights, *momentum]
    generator = torch.Generator(device=y.device).manual_seed(upstream_seed)
    upstream = [torch.randn(x.shape, generator=generator, device=x.device).bfloat16().double() for x in outputs]
    sum((x.double() * g).sum() for x, g in zip(outputs, upstream)).backward()
    return [x.detach() for x in outputs] + [x.grad for x in leaves]


def numerics_rows(device, size):
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for depth in (1, 2):
            for retrieve in ("token", "chunk"):
                torch.manual_seed(depth)
                widths = [size["dim"]] + [4 * size["dim"]] * (depth - 1) + [size["dim"]]
                inputs = make_inputs(size["batch"], size["heads"], size["seq_len"], size["dim"], widths, False)
                inputs = [x.to(device) for x in inputs[:6]] + [tuple(w.to(device) for w in group)
                                                               for group in inputs[6:]]
                inputs[:6] = [x.to(dtype) for x in inputs[:6]]
                options = dict(chunk_size=size["chunk"], retrieve=retrieve)
                actual = scan_results(inputs, options, "triton", 1)
                as_fp64 = [x.double() for x in inputs[:6]] + [tuple(w.double() for w in g) for g in inputs[6:]]
                expected = scan_results(as_fp64, options, "fused", 1)
                error = max((a.double() - e).abs().max().item() / max(e.abs().max().item(), 1e-30)
                            for a, e in zip(actual, expected))
                tolerance = NUMERICS_TOLERANCE[dtype]
                rows.append((f"numerics {str(dtype)[6:]} depth{depth} {retrieve}", f"{error:.2e}",
                             f"<= {tolerance:.1e}", "ok" if error <= tolerance else "ABOVE"))
    return rows


def speed_rows(device, size, peaks):
    rows = []
    widths = [size["dim"]] + [4 * size["dim"]] * (size["depth"] - 1) + [size["dim"]]
    flops = scan_flops(size["batch"], size["heads"], size["seq_len"], widths, size["chunk"], "token")
    tokens = size["batch"] * size["seq_len"]
    shape = f"B{size['batch']} H{size['heads']} T{size['seq_len']} d{size['dim']} depth{size['depth']} chunk{size['chunk']}"
    for dtype, precision in ((torch.float32, "fp32"), (torch.bfloat16, "tf32")):
        torch.manual_seed(0)
        inputs = make_inputs(size["batch"], size["heads"], size["seq_len"], size["dim"], widths)
        leaves = [x.detach().to(device) for x in inputs[:6]]
        leaves = [x.to(dtype).requires_grad_() for x in leaves]
        state = [tuple(w.detach().to(device).requires_grad_() for w in group) for group in inputs[6:]]
        for implementation in ("triton", "fused"):
            def step():
                y, (weights, momentum) = memory_scan(*leaves, *state, chunk_size=size["chunk"],
                                                     implementation=implementation)
                (y.float().square().sum() + sum(w.square().sum() for w in weights)).backward()

            seconds = median_seconds(step, device, size["repeats"])
            achieved = flops / seconds
            rows.append((f"memory_scan {implementation} {str(dtype)[6:]}", f"{tokens / seconds:,.0f} tok/s",
                         f"{achieved / 1e12:.2f} TFLOP/s", f"{fraction(achieved, peak(device, precision, peaks))} of {precision} peak",
                         shape))
    return rows


def model_rows(device, size, peaks):
    rows, rates = [], {}
    for variant in MODEL_VARIANTS:
        config = TitansConfig(variant=variant, vocab_size=size["vocab"], dim=size["dim"], n_heads=size["n_heads"],
                              n_layers=size["n_layers"], chunk_size=size["chunk"], segment_len=size["segment"],
                              window=size["window"])
        torch.manual_seed(0)
        model = TitansLM(config).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        tokens = torch.randint(0, size["vocab"], (size["batch"], size["seq_len"] + 1), device=device)

        def step():
            with torch.autocast(device.type, dtype=torch.bfloat16):
                logits = model(tokens[:, :-1]).logits
                loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        seconds = median_seconds(step, device, size["steps"])
        rate = size["batch"] * size["seq_len"] / seconds
        rates[variant] = rate
        achieved = flops_per_token(config, size["seq_len"]) * rate
        rows.append((f"model step {variant}", f"{rate:,.0f} tok/s", f"{achieved / 1e12:.2f} TFLOP/s",
                     f"MFU {fraction(achieved, peak(device, 'bf16', peaks))}",
                     f"{rate / rates['transformer']:.2f}x transformer tok/s"))
        del model, optimizer
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on CPU, Triton interpreted")
    parser.add_argument("--sections", nargs="+", default=["numerics", "speed", "model"],
                        choices=["numerics", "speed", "model"])
    for precision in ("fp32", "tf32", "bf16"):
        parser.add_argument(f"--peak-{precision}", type=float, help=f"device {precision} dense peak, TFLOP/s")
    args = parser.parse_args()
    if not args.cpu_smoke and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU, or pass --cpu-smoke to exercise the script on CPU")
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    peaks = {p: getattr(args, f"peak_{p}") for p in ("fp32", "tf32", "bf16")}
    size = sizes(args.cpu_smoke)
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu (smoke: numbers are not speeds)'}"
          f", torch {torch.__version__}")
    rows = []
    if "numerics" in args.sections:
        rows += numerics_rows(device, size["numerics"])
    if "speed" in args.sections:
        rows += speed_rows(device, size["speed"], peaks)
    if "model" in args.sections:
        rows += model_rows(device, size["model"], peaks)
    widths = [max(len(row[i]) for row in rows if len(row) > i) for i in range(max(map(len, rows)))]
    for row in rows:
        print(" | ".join(cell.ljust(width) for cell, width in zip(row, widths)))
    if any(row[-1] == "ABOVE" for row in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
