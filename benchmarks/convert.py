"""Conversion cost and HF decoding speed (docs/convert.md).

For each model width and ZeRO stage: train the debug recipe for 3 steps (the checkpoint holds the
fp32 weights and both Adam moments, ~3x the weights: ZeRO-1 in its ZeRO shards, ZeRO-0 inside the
model-states file), then in a fresh process each
  - consolidate it (time, peak RSS above the process's baseline),
  - export it to a Hugging Face directory (time, peak RSS),
and compare greedy decoding speed: `TitansForCausalLM.generate` vs `titans_train.generate`.

The peak should follow the weights, not the checkpoint: the optimizer moments are never read
(`peak_over_weights` stays near 1-2 while `checkpoint_over_weights` is ~3).

    .venv/bin/python benchmarks/convert.py --dims 64 128 256 --zero-stages 0 1 --tokens 200
Timings are only meaningful on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

MEASURE = r"""
import json, resource, sys, time
import torch
from titans_train.convert.consolidate import consolidate
import deepspeed.utils.zero_to_fp32, titans_train.convert.hf_export, titans_train.hf  # imports outside the timings
import_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
consolidated = consolidate(sys.argv[1])
took = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
result = {"consolidate_s": took, "consolidate_peak_mb": (peak - import_rss) / 1024,
          "weights_mb": sum(t.numel() * t.element_size() for t in consolidated.state.values()) / 2**20}
if len(sys.argv) > 2:
    from titans_train.convert.hf_export import export_hf
    start = time.perf_counter()
    export_hf(consolidated, sys.argv[2])
    result["export_s"] = time.perf_counter() - start
    result["export_peak_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - import_rss) / 1024
print(json.dumps(result))
"""

DECODE = r"""
import json, sys, time
import torch
from transformers import AutoModelForCausalLM
from titans_train.generate import generate, load_for_inference
checkpoint, hf_dir, tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
ours, tokenizer, _, _ = load_for_inference(checkpoint)
hf = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True).eval()
prompt = tokenizer.encode("def main(argv):\n    ")
start = time.perf_counter()
generate(ours, prompt, tokens, temperature=0.0, top_k=0)
ours_s = time.perf_counter() - start
ids = torch.tensor([prompt])
start = time.perf_counter()
hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
hf_s = time.perf_counter() - start
print(json.dumps({"titans_generate_tok_s": tokens / ours_s, "hf_generate_tok_s": tokens / hf_s}))
"""


def _run(args: list[str], env: dict[str, str]) -> str:
    result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=1800)
    if result.returncode != 0:
        raise RuntimeError(f"{args[:3]} failed:\n{result.stderr[-3000:]}")
    return result.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--zero-stages", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--tokens", type=int, default=200, help="tokens generated per decoding measurement")
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    python = sys.executable
    titans = [python, "-m", "titans_train"]
    with tempfile.TemporaryDirectory() as root:
        for dim in args.dims:
            for stage in args.zero_stages:
                run_dir = Path(root) / f"d{dim}-zero{stage}"
                _run([*titans, "train", "debug", f"run_dir={run_dir}", f"model.dim={dim}",
                      f"model.n_layers={args.layers}", f"model.n_heads={max(2, dim // 32)}", "train.steps=3",
                      "train.warmup_steps=1", f"parallel.zero_stage={stage}"], env)
                checkpoint = next((run_dir / "checkpoints").glob("step*"))
                size_mb = sum(p.stat().st_size for p in checkpoint.rglob("*") if p.is_file()) / 2**20
                hf_dir = Path(root) / f"hf{dim}-zero{stage}"
                measured = json.loads(_run([python, "-c", MEASURE, str(checkpoint), str(hf_dir)], env).splitlines()[-1])
                decoding = json.loads(_run([python, "-c", DECODE, str(checkpoint), str(hf_dir), str(args.tokens)],
                                           env).splitlines()[-1])
                ratios = {"checkpoint_over_weights": size_mb / measured["weights_mb"],
                          "peak_over_weights": measured["consolidate_peak_mb"] / measured["weights_mb"]}
                print(json.dumps({"dim": dim, "layers": args.layers, "zero_stage": stage,
                                  "checkpoint_mb": round(size_mb, 2),
                                  **{k: round(v, 3) for k, v in {**measured, **ratios, **decoding}.items()}}),
                      flush=True)


if __name__ == "__main__":
    main()
