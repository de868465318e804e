"""Activations: what one micro batch saves for backward (traced: trace.py), what a recomputed layer saves in
backward, one layer's dequantized 4-bit experts, and the loss's transient in backward.

The saved tensors come from the trace, per decoder layer kind, for every family alike. Two transients of backward
are not saved tensors and follow the libraries' code instead: the loss's (a chunk's logits, their fp32 copy and
log-probabilities and two fp32 gradients; over all logits for the model's own loss) and, with sequence
parallelism, the all-to-alls' buffers (two copies of a layer's q at most).
"""

from __future__ import annotations

import math

import torch

from ..dtypes import DtypePolicy
from ..model.loss import chunk_count, logit_softcap
from .skeleton import ModelSpec
from .trace import TraceRun

FP32 = 4


def activation_bytes(spec: ModelSpec, compute: DtypePolicy, run: TraceRun) -> dict[str, int]:
    """activations, recompute, experts_dequantized and logits_backward of one micro batch of `run`."""
    saved = spec.saved(compute, run)
    config = spec.config
    tokens = run.batch * run.seq
    recompute = max(saved.recompute, default=0)
    if run.split > 1:
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        stream = run.autocast or torch.promote_types(compute.norm, compute.dense)
        recompute += 2 * tokens * head_dim * heads * stream.itemsize
    return {
        "activations": saved.total,
        "recompute": recompute,
        # Without checkpointing the experts' matmuls keep what they need of them among the saved tensors.
        "experts_dequantized": max((whole for whole, _ in spec.dequantized_experts), default=0)
        if run.checkpointing
        else 0,
        "logits_backward": logits_backward_bytes(config, compute, run),
    }


def logits_backward_bytes(config, compute: DtypePolicy, run: TraceRun) -> int:
    """The loss in backward: with chunks, one chunk's logits (and their fp32 copy and the soft-capped ones), the
    fp32 log-probabilities and two fp32 gradients; over all logits, two fp32 tensors of tokens x vocabulary."""
    tokens, vocab = run.batch * run.seq, config.vocab_size
    if not run.loss_chunk:
        return 2 * tokens * vocab * FP32
    chunk = math.ceil(tokens / chunk_count(tokens, run.loss_chunk)) * vocab
    logits = (run.autocast or compute.dense).itemsize
    return chunk * (3 * FP32 + (logits if logits != FP32 else 0) + (logits if logit_softcap(config) else 0))
