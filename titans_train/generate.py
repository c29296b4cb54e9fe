"""`titans-train generate --checkpoint DIR --prompt "..."`: continue a prompt from a checkpoint.

The checkpoint carries its resolved config, so the model and tokenizer are rebuilt from it. The
prompt is read in one forward pass; then tokens are sampled one at a time, each fed back with the
model state, so the neural memory keeps updating as the text grows (test-time memorisation).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from titans_train.errors import UserError
from titans_train.train.checkpoint import LATEST, MANIFEST, CheckpointManager


class CheckpointNotFoundError(UserError, FileNotFoundError):
    """No complete checkpoint where one was named."""


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint tag directory from: a tag dir, a checkpoints dir (its latest) or a run dir."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path
    for root in (path, path / "checkpoints"):
        if (root / LATEST).is_file() or root.is_dir():
            manager = CheckpointManager(root, keep_last=1, rank=0, world_size=1,
                                        log=lambda message: print(message, file=sys.stderr))
            for candidate in manager.candidates():
                if not isinstance(candidate, tuple):
                    return candidate.path
                print(f"checkpoint {candidate[0]} is damaged ({candidate[1]}); trying the previous one",
                      file=sys.stderr)
    raise CheckpointNotFoundError(f"no complete checkpoint in {path} (expected a directory with {MANIFEST}, "
                                  f"or a checkpoints directory with `{LATEST}`)")


def load_for_inference(checkpoint_dir: str | Path, device: str = "cpu"):
    """(model in eval mode, tokenizer, resolved config, checkpoint path). Any layout (ZeRO 0-3,
    tp, sp) is read through the conversion tool's consolidation (`titans_train.convert`)."""
    from titans_train.config import config_from_container
    from titans_train.convert.consolidate import consolidate, load_titans_model
    from titans_train.data import load_tokenizer

    consolidated = consolidate(find_checkpoint(checkpoint_dir))
    config = config_from_container(consolidated.run_config)
    model = load_titans_model(consolidated)
    return model.to(device), load_tokenizer(config.data.tokenizer), config, consolidated.checkpoint


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, generator: torch.Generator) -> torch.Tensor:
    """logits (B, V) -> token ids (B, 1); temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        threshold = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    probabilities = torch.softmax(logits, dim=-1)
    return torch.multinomial(probabilities, 1, generator=generator)


@torch.no_grad()
def generate(model, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.8, top_k: int = 50,
             seed: int = 0, stop_id: int | None = None, on_token=None, state=None) -> list[int]:
    """Continue `prompt_ids`; the state (memory included) is carried from token to token.
    `state`: the model state after earlier text the prompt follows (None: the prompt starts it)."""
    if not prompt_ids:
        raise UserError("--prompt is empty: give at least one character to continue")
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    out = model(torch.tensor([prompt_ids], device=device), state=state)  # (1, T): reads the prompt, memory updating
    state, logits = out.state, out.logits[:, -1]
    generated: list[int] = []
    for _ in range(max_new_tokens):
        token = sample_next(logits, temperature, top_k, generator)  # (1, 1)
        token_id = int(token)
        if stop_id is not None and token_id == stop_id:
            break
        generated.append(token_id)
        if on_token is not None:
            on_token(token_id)
        out = model(token, state=state)
        state, logits = out.state, out.logits[:, -1]
    return generated


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="a run dir, its checkpoints dir (uses `latest`) or one checkpoint dir")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    parser.add_argument("--top-k", type=int, default=50, help="0 for no top-k filtering")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")


def run(args: argparse.Namespace) -> int:
    model, tokenizer, _, checkpoint = load_for_inference(args.checkpoint, args.device)
    print(f"[generate] {checkpoint}", file=sys.stderr)
    prompt_ids = tokenizer.encode(args.prompt)
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    # Bytes of one character may arrive in separate tokens: print the decoded text as it grows.
    generated: list[int] = []
    printed = 0

    def emit(token_id: int) -> None:
        nonlocal printed
        generated.append(token_id)
        text = tokenizer.decode(generated)
        safe = text.rstrip("\ufffd")
        sys.stdout.write(safe[printed:])
        sys.stdout.flush()
        printed = len(safe)

    generate(model, prompt_ids, args.max_new_tokens, args.temperature, args.top_k, args.seed,
             stop_id=getattr(tokenizer, "eos_id", None), on_token=emit)
    sys.stdout.write(tokenizer.decode(generated)[printed:] + "\n")
    return 0
