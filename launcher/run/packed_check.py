"""Are the 4-bit weights every rank computes with still the source rank's bytes? (`train.check_4bit_weights`)

The packed 4-bit data is stored as a float dtype so that FSDP and DeepSpeed shard it like any weight,
and every step they gather it back. Any copy on the way that treats those bytes as numbers can change
them: a cast to another dtype, or a kernel that rewrites NaN bit patterns (bitsandbytes issue 1945
reports FSDP2 doing that to bf16-packed NF4 data on GPUs). The data then dequantizes to other weights
and nothing fails. This check takes a digest of every 4-bit weight on the source rank before sharding,
then, on every rank, of the weight each 4-bit linear actually receives in its first forward (after the
strategy gathered it), and records the linears whose bytes differ in shard_report.json. A 4-bit MoE
expert is checked the same way, on the packed bytes its parametrization receives and on the weights it
dequantizes them to.
"""

from __future__ import annotations

import sys

import bitsandbytes as bnb
import torch
from torch import nn

from ..collectives import broadcast_object, is_source_rank
from ..model.experts import Experts4bit
from ..strategies import clean_fqn

CHUNK = 1 << 24
"""Bytes digested at once: the int64 working copies stay a few hundred MB for any weight size."""


def digest(tensor: torch.Tensor) -> tuple[int, int, int]:
    """(bytes, sum of the bytes, position-weighted sum): any rewritten byte changes the last two."""
    data = tensor.detach().contiguous().view(-1).view(torch.uint8)
    total, weighted = 0, 0
    for start in range(0, data.numel(), CHUNK):
        chunk = data[start : start + CHUNK].to(torch.int64)
        positions = torch.arange(start, start + chunk.numel(), device=chunk.device) % 65521 + 1
        total += int(chunk.sum())
        weighted += int((chunk * positions).sum())
    return data.numel(), total, weighted


def four_bit_linears(model: nn.Module) -> dict[str, bnb.nn.Linear4bit]:
    return {clean_fqn(name): m for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def four_bit_experts(model: nn.Module) -> dict[str, Experts4bit]:
    """The dequantizing parametrization of every 4-bit expert parameter."""
    return {clean_fqn(name): m for name, m in model.named_modules() if isinstance(m, Experts4bit)}


def expert_digests(module: Experts4bit, packed: torch.Tensor) -> tuple:
    """The packed bytes an expert parametrization reads and the weights it dequantizes them to."""
    with torch.no_grad():
        return (*digest(packed), *digest(module.forward(packed)))  # not module(): the check is its pre-hook


def packed_of(model: nn.Module, parametrization_name: str) -> torch.Tensor:
    """The packed bytes `<list>.original` of the parametrization `<list>.<index>`."""
    return model.get_submodule(parametrization_name.rpartition(".")[0]).original


class PackedWeightCheck:
    """Digests taken before sharding (`expected`), compared in each 4-bit linear's and expert's first forward."""

    def __init__(self, model: nn.Module):
        """Every rank calls this before sharding; only the source rank has the weights."""
        mine = None
        if is_source_rank():
            mine = {name: digest(m.weight) for name, m in four_bit_linears(model).items()}
            mine |= {name: expert_digests(m, packed_of(model, name)) for name, m in four_bit_experts(model).items()}
        self.expected: dict[str, tuple[int, int, int]] = broadcast_object(mine)
        self.seen: dict[str, str] = {}
        self.hooks = []

    def watch(self, model: nn.Module) -> None:
        """Hooks every 4-bit linear of the sharded model (its weight is gathered when its forward starts)."""
        for name, module in four_bit_linears(model).items():
            self.hooks.append(module.register_forward_pre_hook(self._hook(name, lambda m, args: digest(m.weight))))
        for name, module in four_bit_experts(model).items():
            # Called with the gathered packed bytes; the dequantized result must be the source rank's too.
            self.hooks.append(
                module.register_forward_pre_hook(self._hook(name, lambda m, args: expert_digests(m, *args)))
            )

    def _hook(self, name: str, measure):
        def check(module, args):
            if name not in self.seen:  # the first forward only, not the recompute of checkpointing
                self.seen[name] = "same" if measure(module, args) == tuple(self.expected[name]) else "differs"

        return check

    def result(self) -> dict:
        """For shard_report.json: how many 4-bit linears were checked and which differed; the hooks go."""
        for hook in self.hooks:
            hook.remove()
        differing = sorted(name for name, verdict in self.seen.items() if verdict == "differs")
        if differing:
            print(
                f"qlaunch: WARNING: {len(differing)} 4-bit weights reached their forward with bytes other than the "
                f"source rank's (first: {differing[0]}); the model trains on corrupted base weights",
                file=sys.stderr,
                flush=True,
            )
        return {"checked": len(self.seen), "of": len(self.expected), "differing": differing}
