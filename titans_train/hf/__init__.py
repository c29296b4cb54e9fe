"""A `transformers` causal LM over `TitansLM` (one implementation of the model, no copy).

Importing this package registers the `titans` model type with the Auto classes; a converted
directory also works without it, through `trust_remote_code=True` (docs/convert.md). Nothing
here imports DeepSpeed or megatron-core.
"""

from titans_train.hf.configuration_titans import TitansHFConfig
from titans_train.hf.modeling_titans import TitansCache, TitansForCausalLM


def register() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoConfig.register(TitansHFConfig.model_type, TitansHFConfig, exist_ok=True)
    AutoModelForCausalLM.register(TitansHFConfig, TitansForCausalLM, exist_ok=True)


register()

__all__ = ["TitansCache", "TitansForCausalLM", "TitansHFConfig", "register"]
