"""Activations: the bytes a forward pass saves for backward, per decoder layer, for every family.

A decoder layer is described by what it is made of (`LayerSpec`, read off the meta skeleton by
`skeleton.describe_layer`): its
norms, whether q and k have norms of their own, how attention runs (SDPA or eager, soft-capping,
a sliding window that needs a mask), a dense gated MLP or routed experts, and where LoRA sits. The
rules below say what each part saves, in which dtype, given which inputs require grad (a frozen
linear whose input needs no grad saves nothing). They follow the autograd formulas of the ops
transformers runs, and the training measurement (launcher.memory) checks them per family.

Not modelled (the budget says so when it meets them): shared experts other than a gated MLP (Qwen2-MoE's
is modelled), experts other than fused gate_up/down stacks, padding masks (the prediction assumes full-length micro batches).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..model.loss import chunk_count

FP32 = 4
INDEX = 8
"""int64 indices (top-k choices, gathers)."""


@dataclass(frozen=True)
class LoraSite:
    in_features: int
    out_features: int
    r: int
    dropout: float


@dataclass(frozen=True)
class ActivationDtypes:
    stream: torch.dtype
    """Hidden states between layers: norms output their weight's dtype promoted with the input's
    (Gemma's norms keep the input's dtype instead)."""
    dense: torch.dtype
    """Embedding output and logits."""
    adapter: torch.dtype
    """LoRA weights inside forward (peft casts the input to it)."""
    experts: torch.dtype
    """MoE expert weights: transformers casts the experts' input to it."""
    autocast: torch.dtype | None
    device: str

    def matmul(self, operand: torch.dtype) -> torch.dtype:
        return self.autocast or operand

    def dropout_mask_size(self, operand: torch.dtype) -> int:
        # CUDA's fused dropout keeps a bool mask; on CPU the scaled noise is kept in the input's dtype.
        return 1 if self.device == "cuda" else operand.itemsize


@dataclass(frozen=True)
class LayerSpec:
    """What one decoder layer is made of, as far as the tensors it saves depend on it."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    norms: dict[str, bool]
    """Hidden-size norms by position (pre_attn, post_attn, pre_mlp, post_mlp) -> present."""
    qk_norm: bool
    attention: str
    """sdpa or eager (transformers' attn_implementation)."""
    softcap: bool
    """Eager attention soft-caps its logits (tanh)."""
    window: int | None
    """Sliding window of this layer, None for full attention."""
    mlp: str
    """dense (gated) or moe (routed experts)."""
    intermediate: int
    experts: int = 0
    top_k: int = 0
    normalize_top_k: bool = False
    shared_intermediate: int = 0
    """Width of a shared expert beside the routed ones (Qwen2-MoE), 0 for none."""
    shared_gate: bool = False
    """The shared expert's output is scaled by sigmoid(shared_expert_gate(x))."""
    clamped_glu: bool = False
    """gpt-oss's experts: gate and up clamped, then (up + 1) * gate * sigmoid(alpha * gate)."""
    sinks: bool = False
    """gpt-oss's attention: a learned sink logit per head joins the softmax (eager attention)."""
    lora: dict[str, LoraSite] = field(default_factory=dict)
    """LoRA sites by their path inside the layer (self_attn.q_proj, mlp.gate_up_proj, ...)."""
    expert_lora: dict[str, int] = field(default_factory=dict)
    """Adapted expert parameters (peft's target_parameters) by name -> LoRA rank per expert."""


@dataclass(frozen=True)
class ModelShape:
    layers: list[LayerSpec]
    vocab: int
    gemma_norms: bool
    """Norms multiply by (1 + weight), a tensor they keep, and return the input's dtype."""
    final_softcap: bool
    rotary_sets: int
    """Distinct rotary (cos, sin) pairs a forward computes (Gemma-3 has one for local layers)."""
    lora_on_head: LoraSite | None


def _promote(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    return torch.promote_types(a, b)


def lora_saves(sites: list[LoraSite], tokens: int, x: torch.dtype, x_grad: bool, d: ActivationDtypes) -> int:
    """Bytes saved by the LoRA branches of linears that share one input `x`."""
    total, shared_counted = 0, False
    for site in sites:
        own_copy = x != d.adapter  # peft casts the input to the adapter's dtype, per layer
        kept = d.adapter
        if site.dropout > 0:
            if x_grad:
                total += tokens * site.in_features * d.dropout_mask_size(d.adapter)
            own_copy = True
        mm = d.matmul(d.adapter)
        if mm != d.adapter:  # autocast casts lora_A's input and both weights
            own_copy, kept = True, mm
            total += site.r * (site.in_features + site.out_features) * mm.itemsize
        if own_copy or not shared_counted:
            total += tokens * site.in_features * kept.itemsize
            shared_counted = shared_counted or not own_copy
        total += tokens * site.r * mm.itemsize  # lora_A's output, kept by lora_B
    return total


class LayerSaves:
    """Walks one decoder layer in forward order, adding what each part saves."""

    def __init__(self, layer: LayerSpec, shape: ModelShape, batch: int, seq: int, d: ActivationDtypes, split: int = 1):
        self.layer, self.shape, self.d = layer, shape, d
        self.batch, self.seq, self.tokens = batch, seq, batch * seq
        # Sequence parallel: this rank holds `seq` of the sequence's tokens, and its attention core runs on
        # 1/split of the heads over all of them (the exchanged q, k, v are as many bytes as its own).
        self.split, self.full_seq = split, seq * split
        self.total = 0

    def sites(self, *names: str) -> list[LoraSite]:
        return [self.layer.lora[n] for n in names if n in self.layer.lora]

    def out_dtype(self, names: tuple[str, ...], x: torch.dtype) -> torch.dtype:
        """dtype of a 4-bit linear's output (its input's), promoted with its LoRA branch's."""
        return _promote(x, self.d.matmul(self.d.adapter)) if self.sites(*names) else x

    def norm(self, rows: int, width: int, grad: bool) -> None:
        # RMSNorm keeps its input upcast to fp32 and the fp32 reciprocal root per row; Gemma's
        # also keeps (1 + weight), computed at every call.
        if grad:
            self.total += rows * (width + 1) * FP32 + (width * FP32 if self.shape.gemma_norms else 0)

    def lora(self, names: tuple[str, ...], x: torch.dtype, x_grad: bool) -> bool:
        """Saves of the LoRA branches on `names`; whether their output requires grad."""
        sites = self.sites(*names)
        self.total += lora_saves(sites, self.tokens, x, x_grad, self.d)
        return x_grad or bool(sites)

    def attention(self, x: torch.dtype, grad: bool) -> tuple[torch.dtype, bool]:
        """q/k/v projections, q/k norms and the attention core; (output dtype, output requires grad)."""
        layer, t, d = self.layer, self.tokens, self.d
        projections = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.qkv_proj")
        grad = self.lora(projections, x, grad)
        qkv = d.matmul(self.out_dtype(projections, x))
        if not grad:
            return qkv, False
        q = qkv
        if layer.qk_norm:
            self.norm(t * layer.heads, layer.head_dim, True)
            self.norm(t * layer.kv_heads, layer.head_dim, True)
            if not self.shape.gemma_norms:
                q = d.matmul(_promote(qkv, torch.float32))
        attn = _promote(q, qkv) if d.autocast is None else d.autocast
        h, kv, hd = layer.heads, layer.kv_heads, layer.head_dim
        if layer.attention == "eager":
            # q @ k^T keeps q and k^T, (soft-capped) softmax keeps its fp32 output and a cast of it in
            # the value's dtype, which the second matmul keeps with v; k and v are repeated to all heads.
            scores = self.batch * h // self.split * self.full_seq * self.full_seq
            self.total += 3 * t * h * hd * attn.itemsize + scores * FP32
            self.total += scores * attn.itemsize * (layer.softcap + (attn != torch.float32))
            if layer.sinks:
                # The softmax runs over one more column (the sink), after subtracting a row max that
                # keeps its indices.
                self.total += self.batch * h * self.seq * (FP32 + INDEX)
        else:
            # SDPA keeps q, k, v, its output and the fp32 log-sum-exp. transformers lets it group
            # query heads only without a mask; a sliding window as long as the sequence needs one, and
            # then k and v are repeated to all heads and SDPA keeps the mask, made a float in each call.
            kv_kept = h if self.masked else kv
            self.total += t * hd * (2 * h + 2 * kv_kept) * attn.itemsize + t * h * FP32
            if self.masked:
                self.total += self.batch * self.full_seq * self.full_seq * attn.itemsize
        return attn, True

    @property
    def masked(self) -> bool:
        # transformers skips the mask only while the sequence is shorter than the window.
        return self.layer.attention == "sdpa" and self.layer.window is not None and self.full_seq >= self.layer.window

    def dense_mlp(
        self, x: torch.dtype, grad: bool, prefix: str = "mlp", intermediate: int = 0
    ) -> tuple[torch.dtype, bool]:
        """A gated MLP (`prefix`: where it sits); the dtype of its output and whether it requires grad."""
        gate_names = (f"{prefix}.gate_proj", f"{prefix}.gate_up_proj")
        self.lora((f"{prefix}.gate_proj", f"{prefix}.up_proj", f"{prefix}.gate_up_proj"), x, grad)
        gate = self.out_dtype(gate_names, x)
        gate_grad = grad or bool(self.sites(*gate_names))
        up_grad = grad or bool(self.sites(f"{prefix}.up_proj", f"{prefix}.gate_up_proj"))
        # The activation keeps its input; the product keeps each factor the other's gradient needs
        # (a fused gate_up output is one storage holding both halves: the same bytes).
        width = intermediate or self.layer.intermediate
        self.total += self.tokens * width * gate.itemsize * (gate_grad + up_grad + gate_grad)
        down_grad = self.lora((f"{prefix}.down_proj",), gate, gate_grad or up_grad)
        return self.out_dtype((f"{prefix}.down_proj",), gate), down_grad

    def shared_expert(self, x: torch.dtype, grad: bool) -> None:
        """Qwen2-MoE's shared expert: a gated MLP over every token, scaled by sigmoid(a linear to one value)."""
        out, out_grad = self.dense_mlp(x, grad, "mlp.shared_expert", self.layer.shared_intermediate)
        if not self.layer.shared_gate:
            return
        gate_grad = self.lora(("mlp.shared_expert_gate",), x, grad)
        gate = self.out_dtype(("mlp.shared_expert_gate",), x)
        # sigmoid keeps its output; the product keeps each factor the other's gradient needs.
        if gate_grad:
            self.total += self.tokens * gate.itemsize
        if out_grad:
            self.total += self.tokens * self.layer.hidden * out.itemsize

    def moe(self, grad: bool) -> None:
        if not grad:
            return
        layer, t = self.layer, self.tokens
        pairs = t * layer.top_k
        e = self.d.experts.itemsize
        # Router: fp32 softmax over the experts, the top-k choices (and their renormalisation).
        self.total += t * layer.experts * FP32 + t * layer.top_k * INDEX
        if layer.normalize_top_k:
            self.total += t * layer.top_k * FP32 + t * FP32
        # Experts (transformers' grouped_mm path, frozen weights): the gathers' indices, the gate_up
        # output, the activation's output, the down output and the routing weight it is scaled by.
        self.total += 3 * pairs * INDEX + layer.experts * 4
        self.total += pairs * (3 * layer.intermediate + layer.hidden) * e + pairs * FP32
        if layer.clamped_glu:
            # The clamped gate, up + 1 and their product are kept besides the sigmoid's output.
            self.total += 3 * pairs * layer.intermediate * e
        # An adapted expert weight is W + scaling * B @ A per expert, made by peft in W's dtype at every
        # forward (baddbmm keeps both factors); the grouped matmul keeps it whole, and its input.
        widths = {
            "gate_up_proj": (layer.hidden, 2 * layer.intermediate),
            "down_proj": (layer.intermediate, layer.hidden),
        }
        for name, r in layer.expert_lora.items():
            width_in, width_out = widths[name]
            self.total += layer.experts * (width_in * width_out + (width_in + width_out) * r) * e + pairs * width_in * e

    def run(self, input_grad: bool) -> int:
        layer, d = self.layer, self.d
        stream = d.stream
        norms = layer.norms
        self.norm(self.tokens, layer.hidden, input_grad and norms["pre_attn"])
        attn, grad = self.attention(stream, input_grad)
        grad = self.lora(("self_attn.o_proj",), attn, grad)
        self.norm(self.tokens, layer.hidden, grad and norms["post_attn"])
        self.norm(self.tokens, layer.hidden, grad and norms["pre_mlp"])
        if layer.mlp == "moe":
            self.moe(grad)
            if layer.shared_intermediate:
                self.shared_expert(stream, grad)
        else:
            self.dense_mlp(stream, grad)
        self.norm(self.tokens, layer.hidden, grad and norms["post_mlp"])
        return self.total


def layer_saved_bytes(
    layer: LayerSpec, shape: ModelShape, batch: int, seq: int, input_grad: bool, d: ActivationDtypes, split: int = 1
) -> int:
    """Bytes one decoder layer saves for backward. `input_grad`: whether its input requires grad; `split`: the
    ranks a sequence is split across, of which this one holds `seq` tokens."""
    return LayerSaves(layer, shape, batch, seq, d, split).run(input_grad)


def activation_bytes(
    shape: ModelShape,
    batch: int,
    seq: int,
    checkpointing: bool,
    d: ActivationDtypes,
    linear_saves_input: bool,
    loss_chunk: int = 0,
    split: int = 1,
) -> dict[str, int]:
    """activations (saved for backward by one micro batch), recompute, logits_backward. `loss_chunk`: tokens
    per chunk of the chunked loss (launcher/model/loss.py), 0 for the model's own loss over all logits; `split`: the
    sequence-parallel ranks, of which this one holds `seq` tokens of each row."""
    tokens, vocab = batch * seq, shape.vocab
    first = shape.layers[0]
    hidden = first.hidden
    # After the layers: the final norm, then the loss.
    head = tokens * (hidden + 1) * FP32 + (hidden * FP32 if shape.gemma_norms else 0)
    if loss_chunk:
        # Each chunk is checkpointed: forward keeps the final hidden states and the shifted targets; in
        # backward one chunk at a time has its logits (and their fp32 copy, and the soft-capped ones), the
        # fp32 log-probabilities and two fp32 gradients.
        head += tokens * hidden * d.stream.itemsize + tokens * INDEX
        chunk = math.ceil(tokens / chunk_count(tokens, loss_chunk)) * vocab
        logits = d.matmul(d.dense).itemsize
        loss = chunk * (3 * FP32 + (logits if logits != FP32 else 0) + (logits if shape.final_softcap else 0))
    else:
        head += output_layer_saves(shape, tokens, hidden, d, linear_saves_input)
        loss = 2 * tokens * vocab * FP32
    layers = [layer_saved_bytes(layer, shape, batch, seq, True, d, split) for layer in shape.layers]
    if checkpointing:
        # Each layer keeps only its input (the first one the embedding output); in backward, one layer
        # at a time is recomputed with everything it saves.
        saved = tokens * hidden * (d.dense.itemsize + (len(layers) - 1) * d.stream.itemsize)
        recompute = max(layers) - (tokens * hidden * FP32 if d.stream == torch.float32 else 0)
    else:
        # The first layer's input does not require grad, so its first norm saves nothing; rotary cos
        # and sin are made once per forward and shared by the layers.
        saved = layer_saved_bytes(first, shape, batch, seq, False, d, split) + sum(layers[1:])
        saved += shape.rotary_sets * 2 * seq * first.head_dim * d.dense.itemsize
        recompute = 0
    if split > 1:
        # The all-to-alls around attention exchange q, k, v (and the output) one at a time, each holding what
        # it sends (a contiguous copy, where the tensor is a transposed view) and what it receives until both
        # are joined: at most two copies of q, in forward, recompute and backward alike.
        attn = d.matmul(d.stream)
        recompute += 2 * tokens * first.head_dim * first.heads * attn.itemsize
    return {"activations": saved + head, "recompute": recompute, "logits_backward": loss}


def output_layer_saves(
    shape: ModelShape, tokens: int, hidden: int, d: ActivationDtypes, linear_saves_input: bool
) -> int:
    """What the model's own loss saves after the final norm: lm_head's (ZeRO-3's linear keeps its input;
    autocast keeps a cast of a weight stored in another dtype), soft-capping's (tanh keeps its output), and
    the loss's: fp32 log-probabilities and targets."""
    vocab = shape.vocab
    saved = tokens * vocab * FP32 + tokens * INDEX + FP32
    if linear_saves_input:
        saved += tokens * hidden * d.matmul(d.stream).itemsize
    if d.autocast and d.dense != d.autocast:
        saved += vocab * hidden * d.autocast.itemsize
    if shape.final_softcap:
        saved += tokens * vocab * d.matmul(d.dense).itemsize
    if shape.lora_on_head:
        saved += lora_saves([shape.lora_on_head], tokens, d.stream, True, d)
    return saved
