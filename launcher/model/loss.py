"""The training loss: next-token cross-entropy computed over chunks of tokens, never over all logits.

transformers' causal-LM forward projects every token onto the whole vocabulary, upcasts the logits to
fp32, keeps the fp32 log-probabilities for backward and then makes two fp32 tensors of the same size
in backward: at 32k tokens and Llama-3's 128,256 words that is 47 GiB, most of a long-context budget.
Here the forward of the causal LM is the model's own decoder (`model.model`) followed by the output
layer and the loss over at most `train.loss_chunk_tokens` tokens at a time, each chunk under non-reentrant
checkpointing: a chunk's logits exist only while it is computed, in forward and again in backward,
and what forward keeps is the final hidden states and the targets. The output layer is called as a
module, so FSDP's and ZeRO-3's gathering hooks, a LoRA adapter on it and tied embeddings work as in
the model's own forward. The per-token losses are the model's own (the same ops on the same values);
only the order of the sum over tokens differs.

Forwards without labels (generation, the adapter check) run the model's own forward unchanged.
"""

from __future__ import annotations

import math
import types

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.modeling_outputs import CausalLMOutputWithPast

IGNORE = -100
"""The label of tokens that are not trained on (prompt, padding), as transformers uses it."""
SCALED_LOGITS = ("logit_scale", "logits_scaling")
"""Config fields of families whose forward scales the logits before the loss (Cohere, Granite)."""


def chunking_refusal(config) -> str | None:
    """Why the chunked loss cannot stand in for this model's own (None: it can)."""
    for name in SCALED_LOGITS:
        if getattr(config, name, None) not in (None, 1, 1.0):
            return f"`{type(config).__name__}` scales its logits (`{name}`)"
    if getattr(config, "output_router_logits", False):
        return f"`{type(config).__name__}` adds the router's load-balancing loss (`output_router_logits: true`)"
    return None


def loss_chunk_tokens(config, train) -> int:
    """Tokens per chunk this model's loss runs with (`train.loss_chunk_tokens`), 0 for its own loss."""
    return 0 if chunking_refusal(config) else train.loss_chunk_tokens


def chunk_count(max_tokens: int, chunk_tokens: int) -> int:
    """Chunks per micro batch: the same on every rank whatever its micro batch's length, because ZeRO-3
    gathers the output layer at each of its calls (a rank with one chunk more waits in a collective that
    the others never start)."""
    return max(1, math.ceil(max_tokens / chunk_tokens))


def install_chunked_loss(model: nn.Module, chunk_tokens: int, max_tokens: int) -> None:
    """Makes `model`'s (a transformers causal LM's) forward compute its loss in `chunk_count` chunks of at
    most `chunk_tokens` tokens for micro batches of up to `max_tokens` tokens (micro batch x max_seq_len)."""
    chunks = chunk_count(max_tokens, chunk_tokens)
    own_forward = model.forward
    softcap = getattr(model.config, "final_logit_softcapping", None)  # Gemma-2/3: tanh, as their forward does

    def forward(self, *args, **kwargs):
        labels, shift_labels = kwargs.pop("labels", None), kwargs.pop("shift_labels", None)
        if labels is None and shift_labels is None:
            return own_forward(*args, **kwargs)
        num_items = kwargs.pop("num_items_in_batch", None)
        kwargs.pop("logits_to_keep", None)
        outputs = self.model(*args, **kwargs)
        if shift_labels is None:
            shift_labels = F.pad(labels, (0, 1), value=IGNORE)[..., 1:]
        head = self.get_output_embeddings()
        loss = chunked_cross_entropy(head, outputs.last_hidden_state, shift_labels, num_items, chunks, softcap)
        return CausalLMOutputWithPast(loss=loss)

    model.forward = types.MethodType(forward, model)


def chunked_cross_entropy(
    head: nn.Module,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    num_items: float | torch.Tensor | None,
    chunks: int,
    softcap: float | None = None,
) -> torch.Tensor:
    """Cross-entropy of `head(hidden)` against `targets` (already shifted; IGNORE is not counted) in `chunks`
    nearly equal pieces (some empty when there are fewer tokens), summed and divided by `num_items`, or
    averaged over the counted tokens when it is None, as transformers does."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1).to(hidden.device)
    total = sum(
        checkpoint(_chunk_loss_sum, head, h, t, softcap, use_reentrant=False)
        for h, t in zip(hidden.tensor_split(chunks), targets.tensor_split(chunks), strict=True)
    )
    if num_items is None:
        return total / (targets != IGNORE).sum()
    if torch.is_tensor(num_items):
        num_items = num_items.to(total.device)
    return total / num_items


def _chunk_loss_sum(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, softcap: float | None):
    logits = head(hidden)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE, reduction="sum")
