"""The training objective DeepSpeed wraps: next-token cross-entropy over (B, T + 1) token blocks.

Every sample is an independent sequence: the model starts from its initial memory state
(`state=None`). With activation checkpointing the model is driven layer by layer and each
layer's activations are recomputed in backward (`torch.utils.checkpoint`, non-reentrant).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


class LanguageModelObjective(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, activation_checkpointing: bool = False):
        super().__init__()
        self.model = model
        self.activation_checkpointing = activation_checkpointing

    def _checkpointed_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.model.embed_tokens(input_ids)  # (B, T, D)
        for layer in self.model.layers:
            hidden, _ = checkpoint(layer, hidden, None, 0, use_reentrant=False)
        return self.model.final_logits(hidden)

    def forward(self, tokens: torch.Tensor, return_telemetry: bool = False):
        """(mean loss over the B x T predicted tokens, telemetry dict or None)."""
        input_ids, targets = tokens[:, :-1], tokens[:, 1:]  # (B, T) each
        telemetry = None
        if self.activation_checkpointing and torch.is_grad_enabled() and not return_telemetry:
            logits = self._checkpointed_logits(input_ids)
        else:
            out = self.model(input_ids, return_telemetry=return_telemetry)
            logits = out.logits
            telemetry = getattr(out, "telemetry", None) if return_telemetry else None
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
        return loss, telemetry
