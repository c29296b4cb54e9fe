"""`TitansForCausalLM`: `PreTrainedModel` + `GenerationMixin` over the one `TitansLM`.

The decoding state is the model's own `ModelState` (memory weights and momentum, the open chunk
or segment, conv tails, attention window, position), carried in `TitansCache`, so
`generate(...)` keeps updating the memory as it reads the prompt and writes its continuation.

Padding. A row's memory chunks (and MAC segments) are closed at positions counted in *its own*
tokens, and every token a row reads changes its memory, so a pad token must never be fed to the
model and rows at different positions cannot share one `ModelState`. The cache therefore keeps
the rows in groups of equal position, each with its own `ModelState`; a forward call feeds each
group only its real tokens (those the `attention_mask` marks 1) and writes their logits into the
padded (B, T, V) output (pad positions get zero logits). Only left padding is accepted, as
`generate` needs: after the prompt every row reads one real token per step, so the groups made at
the prompt stay fixed and decoding costs one batched call per distinct prompt length. A batch
without padding is one group: one call, as in `titans-train generate`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from titans_train.hf.configuration_titans import TitansHFConfig
from titans_train.model import ModelState, TitansLM


@dataclass
class RowGroup:
    """Rows of the batch (indices) at the same position, and their state (None at position 0)."""

    rows: list[int]
    state: Optional[ModelState]

    @property
    def position(self) -> int:
        return 0 if self.state is None else self.state.position

    def select(self, members: list[int]) -> "RowGroup":
        """The sub-group of `members` (indices into `rows`), state sliced along the batch."""
        if members == list(range(len(self.rows))):
            return self
        rows = [self.rows[m] for m in members]
        if self.state is None:
            return RowGroup(rows, None)
        device = next(iter(self.state.layers[0].values())).device
        index = torch.tensor(members, device=device)
        layers = [{name: value.index_select(0, index) for name, value in layer.items()}
                  for layer in self.state.layers]
        return RowGroup(rows, ModelState(self.state.position, layers))


class TitansCache(Cache):
    """Generation state of a (B, T) batch: `RowGroup`s covering the B rows, and how many input
    columns (padding included) have been read, which is what `generate` slices its inputs by."""

    def __init__(self, batch_size: int):
        super().__init__(layers=[])  # no per-layer key/value tensors: the state is the model's
        self.batch_size_ = batch_size
        self.columns = 0
        self.groups = [RowGroup(list(range(batch_size)), None)]

    @property
    def batch_size(self) -> int:
        return self.batch_size_

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.columns

    def positions(self) -> list[int]:
        """Real tokens read so far, per row."""
        out = [0] * self.batch_size_
        for group in self.groups:
            for row in group.rows:
                out[row] = group.position
        return out

    def _select_rows(self, sources: list[int]) -> None:
        """Row i of the new batch is row sources[i] of the old one (beam search, repeats)."""
        where = {row: (g, m) for g, group in enumerate(self.groups) for m, row in enumerate(group.rows)}
        by_group: dict[int, list[tuple[int, int]]] = {}
        for new_row, source in enumerate(sources):
            g, m = where[source]
            by_group.setdefault(g, []).append((new_row, m))
        groups = []
        for g, pairs in by_group.items():
            picked = self.groups[g].select([m for _, m in pairs])
            groups.append(RowGroup([new_row for new_row, _ in pairs], picked.state))
        self.groups, self.batch_size_ = groups, len(sources)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_rows([int(i) for i in beam_idx])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select_rows([row for row in range(self.batch_size_) for _ in range(repeats)])

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select_rows([int(i) for i in indices])

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError("a Titans cache cannot be cropped: its memory has already absorbed those tokens; "
                         "regenerate from the shorter prefix instead")

    @property
    def is_compileable(self) -> bool:
        return False


def _real_token_counts(mask: torch.Tensor, positions: list[int]) -> list[int]:
    """Real tokens per row of the new columns' mask (B, t); only left padding is accepted."""
    counts = mask.sum(dim=1).tolist()
    width = mask.shape[1]
    for row, (count, position) in enumerate(zip(counts, positions)):
        expected = torch.zeros(width, dtype=mask.dtype, device=mask.device)
        expected[width - int(count):] = 1
        if not torch.equal(mask[row], expected) or (position > 0 and count != width):
            raise ValueError(f"attention_mask row {row}: only left padding is supported (pads first, then "
                             "real tokens, then no more pads); set tokenizer.padding_side = 'left'")
    return [int(c) for c in counts]


class TitansPreTrainedModel(PreTrainedModel):
    config_class = TitansHFConfig
    config: TitansHFConfig
    base_model_prefix = "model"
    _is_stateful = True  # the memory cannot be rolled back: no assisted decoding
    _no_split_modules = ["TitansBlock"]

    def _init_weights(self, module: nn.Module) -> None:
        # TitansLM initialises itself when built (docs/model.md); from_pretrained loads every
        # weight from the checkpoint, so there is nothing left to initialise here.
        pass


class TitansForCausalLM(TitansPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"model.lm_head.weight": "model.embedding.weight"}

    def __init__(self, config: TitansHFConfig):
        super().__init__(config)
        self.model = TitansLM(config.titans_config())
        if not config.tie_word_embeddings:
            self._tied_weights_keys = {}
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the forward makes its own TitansCache

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embedding

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embedding = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.model.lm_head

    def forward(self, input_ids: torch.LongTensor, attention_mask: Optional[torch.Tensor] = None,
                cache: Optional[TitansCache] = None, labels: Optional[torch.LongTensor] = None,
                use_cache: Optional[bool] = None, return_dict: Optional[bool] = None,
                **kwargs) -> CausalLMOutputWithPast:
        """input_ids (B, t): the next t columns after what `cache` has read; attention_mask
        (B, columns read + t) or (B, t), 1 for real tokens. Logits (B, t, V)."""
        use_cache = self.config.use_cache if use_cache is None else use_cache
        batch, width = input_ids.shape
        if cache is None:
            cache = TitansCache(batch)
        elif not isinstance(cache, TitansCache):
            raise TypeError(f"cache must be a TitansCache (from a previous output), got {type(cache).__name__}")
        if cache.batch_size != batch:
            raise ValueError(f"the cache holds {cache.batch_size} rows, input_ids has {batch}; "
                             "pass the cache of the same batch")
        mask = None if attention_mask is None else attention_mask[:, -width:]
        counts = [width] * batch if mask is None else _real_token_counts(mask, cache.positions())
        logits = None
        groups = []
        for group in cache.groups:
            by_count: dict[int, list[int]] = {}
            for member, row in enumerate(group.rows):
                by_count.setdefault(counts[row], []).append(member)
            for count, members in by_count.items():
                sub = group.select(members)
                if count == 0:
                    groups.append(sub)
                    continue
                rows = torch.tensor(sub.rows, device=input_ids.device)
                out = self.model(input_ids[rows, width - count:], state=sub.state)
                if logits is None:
                    logits = out.logits.new_zeros(batch, width, out.logits.shape[-1])
                logits[rows, width - count:] = out.logits
                groups.append(RowGroup(sub.rows, out.state))
        if logits is None:
            raise ValueError("every row of this call is padding; pass at least one real token")
        cache.groups = groups
        cache.columns += width
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache if use_cache else None)
