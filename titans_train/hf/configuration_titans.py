"""`TitansHFConfig`: a `transformers` config carrying a `TitansConfig` (the model's own, whole)."""

from __future__ import annotations

from typing import Any, Optional

from transformers import PretrainedConfig


class TitansHFConfig(PretrainedConfig):
    """`titans` holds `TitansConfig.to_dict()`; the usual HF names mirror its fields so generic
    tools (evaluation harnesses, `generate`) find the vocabulary, width and depth."""

    model_type = "titans"

    def __init__(self, titans: Optional[dict[str, Any]] = None, eos_token_id: Optional[int] = None,
                 pad_token_id: Optional[int] = None, bos_token_id: Optional[int] = None, use_cache: bool = True,
                 **kwargs):
        from titans_train.model import TitansConfig

        model = TitansConfig.from_dict(dict(titans)) if titans else TitansConfig()
        self.titans = model.to_dict()
        self.vocab_size = model.vocab_size
        self.hidden_size = model.dim
        self.num_hidden_layers = model.n_layers
        self.num_attention_heads = model.n_heads
        self.use_cache = use_cache
        kwargs["tie_word_embeddings"] = model.tie_embeddings
        super().__init__(eos_token_id=eos_token_id, pad_token_id=pad_token_id, bos_token_id=bos_token_id, **kwargs)

    def titans_config(self):
        from titans_train.model import TitansConfig

        return TitansConfig.from_dict(dict(self.titans))
