"""`ppl`: perplexity over a whole held-out split, and the loss by token position, at any length.

The split is read as one token stream: its samples in key order (a sample's key is its place in
the stream it was cut from, `data/prepare.py`, so consecutive keys are contiguous text). At
length L the stream is cut into windows of L + 1 tokens at stride L + 1; at the training length
these windows are exactly the prepared samples, the same tokens training validates on. Every
window is read in segments (`segment` tokens, default the training length) with the model state
carried from one to the next (DESIGN section 5), so memory stays flat as L grows for the
memory and sliding-window variants (full attention keeps every key and value: it grows).

Result per length: mean loss and perplexity over every predicted token of the split, and the
mean loss in position buckets [start, stop) of the window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from titans_train.eval.distributed import EvalLayout, all_reduce_sums
from titans_train.eval.errors import EvalOptionError


def held_out_stream(directory: str, tokenizer=None) -> np.ndarray:
    """The prepared split at `directory` as one 1-D token stream (samples in key order)."""
    from titans_train.data import PreparedDataset

    dataset = PreparedDataset(directory, tokenizer)
    keys, tokens = dataset.read(np.arange(len(dataset)))
    return tokens[np.argsort(keys, kind="stable")].reshape(-1)


def windows(stream: np.ndarray, length: int) -> np.ndarray:
    """(M, length + 1) windows of the stream at stride length + 1 (the tail is dropped)."""
    count = len(stream) // (length + 1)
    return stream[: count * (length + 1)].reshape(count, length + 1)


@torch.no_grad()
def streamed_token_losses(model, tokens: torch.Tensor, segment: int, context) -> torch.Tensor:
    """Per-token losses (B, L) of windows `tokens` (B, L + 1), read `segment` tokens per call
    with the state carried; `model` may be tensor-parallel (vocab-sharded logits)."""
    from titans_train.parallel.tensor_parallel import token_losses

    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    state, losses = None, []
    for start in range(0, inputs.shape[1], segment):
        out = model(inputs[:, start:start + segment], state=state)
        state = out.state
        losses.append(token_losses(out.logits, labels[:, start:start + segment], context.tp_size))
    return torch.cat(losses, dim=1)


@dataclass
class PerplexityResult:
    length: int
    windows: int
    position_loss_sums: np.ndarray  # (length,) summed over every window

    @property
    def tokens(self) -> int:
        return self.windows * self.length

    @property
    def loss(self) -> float:
        return float(self.position_loss_sums.sum() / self.tokens)

    def buckets(self, width: int) -> list[dict]:
        out = []
        for start in range(0, self.length, width):
            stop = min(start + width, self.length)
            out.append({"start": start, "stop": stop,
                        "loss": float(self.position_loss_sums[start:stop].sum() / (self.windows * (stop - start)))})
        return out

    def as_dict(self, bucket_width: int) -> dict:
        return {"length": self.length, "windows": self.windows, "tokens": self.tokens, "loss": self.loss,
                "ppl": math.exp(min(self.loss, 50.0)), "buckets": self.buckets(bucket_width)}


def perplexity(model, stream: np.ndarray, length: int, layout: EvalLayout, segment: int,
               batch_size: int = 8) -> PerplexityResult:
    """Loss by position over every window of `stream` at `length`; the same on every layout."""
    all_windows = windows(stream, length)
    if len(all_windows) == 0:
        raise EvalOptionError("--lengths", f"{length} needs {length + 1} tokens per window; the held-out split has "
                              f"only {len(stream)}: use shorter lengths or a larger split (--data)")
    device = next(model.parameters()).device
    sums = torch.zeros(length, dtype=torch.float64)
    mine = layout.part(len(all_windows))
    for first in range(0, len(mine), batch_size):
        batch = torch.from_numpy(all_windows[mine[first:first + batch_size]].astype(np.int64)).to(device)
        sums += streamed_token_losses(model, batch, segment, layout.context).to(torch.float64).sum(dim=0).cpu()
    return PerplexityResult(length, len(all_windows), all_reduce_sums(sums, layout).numpy())
