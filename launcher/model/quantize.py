"""Where the source rank quantizes the base: each 4-bit weight on a chosen device, the result in host RAM.

transformers (5.x) quantizes while it loads, one weight at a time in checkpoint order and on the loading
thread (it turns its loader's threads off for on-the-fly quantization): `Bnb4bitQuantize.convert` wraps
the checkpoint tensor in a `bnb.nn.Params4bit` and moves it to the weight's device, and
`Params4bit.to` calls `Params4bit._quantize(device)`, which copies the tensor to `device` and runs
`bnb.functional.quantize_4bit` there. With `device_map={"": "cpu"}` that device is the host.

`quantizing_on(device)` changes only that one step, for the duration of a `from_pretrained` call:
each `_quantize` runs on `device` (copying one weight there, quantizing it, and dropping the copy),
then moves the packed data and its quant state (absmax, code, the nested constants of double
quantization) to where the loader asked for them, the host. Which modules become 4-bit, key
conversions (fused projections, fused MoE experts), tied weights and every unquantized tensor stay
transformers' own. On a GPU this holds one weight's unquantized copy and its packed result at a
time, never the model. With `device` the host itself it quantizes exactly as an ordinary load does:
the tests run that path on the CPU and count that it saw every 4-bit weight.

`reading_without_mmap()` keeps the checkpoint's pages out of the process while it loads. transformers
memory-maps each safetensors file and quantizes each weight straight from the mapping, so every page
it reads stays resident in the process (counted in its RSS) until the load ends: the whole bf16
checkpoint, on top of the quantized result. Inside this context its loader reads each tensor with
`pread(2)` instead (safetensors' own "pread" backend, which transformers itself uses on Windows and
MPS): a weight to quantize is an ordinary copy freed once quantized, and what stays unquantized
(embeddings, norms, the output layer) is an owned copy of the same bytes. The file's pages then sit
in the kernel's page cache, which it reclaims as it needs, not in the process. The bytes read are the
same; the tests compare the result with the ordinary load bit for bit.

Both patches are on shared objects (the `Params4bit` class, transformers' module), so they apply to any
load in the process while the context is open: the source rank opens them around its own load only,
on its main thread.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import bitsandbytes as bnb
import torch

_patching = threading.RLock()


@dataclass
class Quantized:
    """What one `quantizing_on` context did: where each 4-bit weight was quantized and where it went."""

    device: torch.device
    weights: list[tuple[tuple[int, ...], torch.device, torch.device]] = field(default_factory=list)
    """(unquantized shape, device quantized on, device the packed result was left on), one per weight."""


@contextlib.contextmanager
def quantizing_on(device: torch.device | str) -> Iterator[Quantized]:
    """Every `Params4bit` quantized inside is quantized on `device`; its result goes where it was sent."""
    device = torch.device(device)
    done = Quantized(device)
    original = bnb.nn.Params4bit._quantize

    def _quantize(self: bnb.nn.Params4bit, target) -> bnb.nn.Params4bit:
        target = torch.device(target)
        shape = tuple(self.shape)
        original(self, device)
        quantized_on = self.data.device
        if target != device:
            self.data = self.data.to(target)
            self.quant_state.to(target)  # in place; the module holds the same object
        done.weights.append((shape, quantized_on, self.data.device))
        return self

    with _patching:
        bnb.nn.Params4bit._quantize = _quantize
        try:
            yield done
        finally:
            bnb.nn.Params4bit._quantize = original
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the allocator's cached blocks of the last weights


@contextlib.contextmanager
def reading_without_mmap() -> Iterator[None]:
    """transformers reads safetensors checkpoints onto the CPU with `pread(2)`, not a memory map."""
    import safetensors
    import transformers.modeling_utils as loading

    original = getattr(loading, "safe_open", None)
    if original is not safetensors.safe_open:  # a transformers that opens its files some other way: as it is
        yield
        return

    def safe_open(filename, framework, device="cpu", **kwargs):
        if str(device) == "cpu":
            kwargs["backend"] = "pread"
        return original(filename, framework, device=device, **kwargs)

    with _patching:
        loading.safe_open = safe_open
        try:
            yield
        finally:
            loading.safe_open = original
