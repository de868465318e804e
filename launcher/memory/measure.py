"""Measure: what each rank really holds, per component, next to the budget's prediction.

Every rank counts the bytes each component owns on it, exactly, storage by storage (a storage seen
through several views or tensors counts once):
  * after sharding: its local parameter shards (with the padding their storages carry), the 4-bit
    quantization constants and the module buffers;
  * during the first optimizer step: the gradients the optimizer steps with, the master copies it
    updates when they are not the model's own parameters (ZeRO), its states after the step, and the
    activations saved for backward during each forward pass (`saved_tensors_hooks`; storages of
    parameters, gathered or not, are weights and do not count).
On CUDA the same accounting runs, and torch.cuda's statistics (allocated, reserved, peak over the
first step) come with it. Rank 0 gathers every rank, prints predicted vs measured at the start and
the end of training, and writes `<output_dir>/memory_budget.json` and `memory_budget.png`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

from ..config import ConfigError
from ..strategies import Strategy, clean_fqn
from ..strategies.handoff import quant_state_owners
from ..vision import ImageInputs, is_vision_language
from .components import COMPONENTS, WEIGHT_COMPONENTS, parameter_components
from .cuda_peaks import CudaPeaks
from .predict import Budget, Hardware, predict
from .report import plot_stacked, rank_groups, render_table
from .sizes import format_bytes
from .skeleton import ModelCache

REPORT_JSON = "memory_budget.json"
REPORT_PNG = "memory_budget.png"


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The part of a (possibly DTensor) value that lives on this rank."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


class StorageTally:
    """Bytes of distinct storages: another view of a storage already counted adds nothing."""

    def __init__(self, exclude: set[int] = frozenset()):
        self.exclude = exclude
        self.seen: set[int] = set()
        self.storages: dict[int, torch.UntypedStorage] = {}
        self.bytes = 0

    def add(self, tensor: torch.Tensor) -> int:
        storage = _local(tensor).untyped_storage()
        pointer, nbytes = storage.data_ptr(), storage.nbytes()
        if nbytes == 0 or pointer in self.seen or pointer in self.exclude:
            return 0
        self.seen.add(pointer)
        self.storages[pointer] = storage
        self.bytes += nbytes
        return nbytes


def gradient_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the gradients a torch optimizer is about to step with (call it in a step pre-hook)."""
    gradients = StorageTally()
    for group in optimizer.param_groups:
        for param in group["params"]:
            if param.grad is not None:
                gradients.add(param.grad)
    return gradients.bytes


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of a torch optimizer's per-element states (e.g. AdamW's moments)."""
    states = StorageTally()
    for state in optimizer.state.values():
        for value in state.values():
            # 0-dim values are step counters, kept on the host even on CUDA.
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                states.add(value)
    return states.bytes


def quant_state_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Every tensor of every 4-bit layer's and expert's QuantState (on the module and on its weight)."""
    tensors = []
    for module in quant_state_owners(model):
        states = (module.quant_state, getattr(getattr(module, "weight", None), "quant_state", None))
        for state in {id(s): s for s in states if s is not None}.values():
            tensors += [state.absmax, state.code]
            if state.nested:
                tensors += [state.offset, state.state2.absmax, state.state2.code]
    return tensors


def measure_weights(
    model: nn.Module, sharder: Strategy, kinds: dict[str, str] | None = None
) -> tuple[dict[str, int], set[int]]:
    """This rank's weight components in bytes, and the storages (data pointers) that hold them.
    `kinds`: each parameter's component, read before sharding (FSDP1 and ZeRO-3 flatten parameters,
    so their shapes no longer say what they are); default: read off `model`."""
    kinds = kinds or parameter_components(model)
    held = dict.fromkeys(WEIGHT_COMPONENTS, 0)
    storages = StorageTally()
    for shard in sharder.local_shards(model):
        valid = max(0, min(shard.local.numel(), shard.full_numel - shard.start))
        nbytes = valid * shard.local.element_size()
        held[kinds[clean_fqn(shard.name)]] += nbytes
        held["shard_padding"] -= nbytes
        held["shard_padding"] += storages.add(shard.local)
    quant = StorageTally()
    for tensor in quant_state_tensors(model):
        quant.add(tensor)
    held["quant_states"] = quant.bytes
    buffers = StorageTally()
    for buffer in model.buffers():
        buffers.add(buffer)
    held["buffers"] = buffers.bytes
    return held, storages.storages


def still_at(storages: dict[int, torch.UntypedStorage], pointer: int) -> bool:
    """Whether a storage noted at `pointer` is still there. One that was freed (or resized to nothing, as FSDP frees
    gathered parameters) no longer is, and a new tensor may sit at its old address: an activation there must not
    be taken for a weight."""
    storage = storages.get(pointer)
    return storage is not None and storage.data_ptr() == pointer and storage.nbytes() > 0


class FirstStepProbe:
    """Hooks that watch the first optimizer step of training, then remove themselves.

    Forward passes before that step (one per micro batch) record the bytes saved for backward; the
    optimizer's own step hooks record the gradients and master copies it steps with, and its states
    after the step. Parameter storages are told apart from activations by registering each module's
    parameters while the module runs (after FSDP or ZeRO-3 have gathered them).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        weight_storages: dict[int, object],
        offload=None,
        image_token_id: int | None = None,
    ):
        self.weight_storages = weight_storages
        self.image_token_id = image_token_id  # a vision-language model's: the largest forward's images are noted
        self.offload = offload
        """An ActivationOffload whose hooks these replace during the first step: each saved tensor goes on to it."""
        self.running_params: dict[int, int] = {}
        self.running_storages: dict[int, torch.UntypedStorage] = {}
        self.started_pointers: list[list[int]] = []
        self.saved = 0
        """Bytes saved for backward so far by the forward pass running now."""
        self.saved_storages: dict[int, StorageWeakRef] = {}
        self.saved_hooks = None
        self.activations = 0
        self.activation_shape: tuple[int, int] | None = None
        self.shape: tuple[int, int] | None = None
        """(batch, sequence) of the forward pass running now."""
        self.activation_images: ImageInputs | None = None
        self.images: ImageInputs | None = None
        """The image inputs of the forward pass running now."""
        self.measured: dict[str, int] = {"gradients": 0}
        self.master = StorageTally(exclude=weight_storages)
        self.groups_left = len(optimizer.param_groups)
        """DeepSpeed steps its torch optimizer one parameter group at a time (each group's fp32 gradients freed
        after its step): the first step is over once every group has stepped."""
        self.done = False
        self.handles = [
            model.register_forward_pre_hook(self._forward_started, with_kwargs=True),
            model.register_forward_hook(self._forward_finished),
            optimizer.register_step_pre_hook(self._before_step),
            optimizer.register_step_post_hook(self._after_step),
        ]
        for module in model.modules():
            self.handles.append(module.register_forward_pre_hook(self._module_started))
            self.handles.append(module.register_forward_hook(self._module_finished))

    def _module_started(self, module, args):
        storages = [p.untyped_storage() for p in module.parameters(recurse=False)]
        pointers = [storage.data_ptr() for storage in storages]
        for pointer, storage in zip(pointers, storages, strict=True):
            self.running_params[pointer] = self.running_params.get(pointer, 0) + 1
            self.running_storages[pointer] = storage
        self.started_pointers.append(pointers)

    def _module_finished(self, module, args, output):
        # By now FSDP may have freed the gathered parameters: forget the pointers noted at the start.
        for pointer in self.started_pointers.pop():
            self.running_params[pointer] -= 1
            if not self.running_params[pointer]:
                del self.running_params[pointer], self.running_storages[pointer]

    def _pack(self, tensor: torch.Tensor):
        if tensor.device.type != "meta":
            storage = tensor.untyped_storage()
            pointer = storage.data_ptr()
            if not still_at(self.running_storages, pointer) and not still_at(self.weight_storages, pointer):
                self._count_saved(storage)
        return self.offload.pack(tensor) if self.offload else tensor

    def _count_saved(self, storage: torch.UntypedStorage) -> None:
        # Offload copies each saved tensor to the host and drops it: a later activation may then sit at the address
        # of one already counted, and is another storage all the same.
        pointer = storage.data_ptr()
        counted = self.saved_storages.get(pointer)
        if counted is None or counted.expired():
            self.saved_storages[pointer] = StorageWeakRef(storage)
            self.saved += storage.nbytes()

    def _unpack(self, packed):
        return self.offload.unpack(packed) if self.offload else packed

    def _forward_started(self, module, args, kwargs):
        self.saved, self.saved_storages = 0, {}
        self.saved_hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self.saved_hooks.__enter__()
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        self.shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else None
        if self.image_token_id is not None:
            self.images = ImageInputs.of(kwargs, self.image_token_id)

    def _forward_finished(self, module, args, output):
        self.saved_hooks.__exit__(None, None, None)
        if self.saved >= self.activations:
            self.activations, self.activation_shape, self.activation_images = self.saved, self.shape, self.images
        self.saved, self.saved_storages = 0, {}

    def _before_step(self, optimizer, args, kwargs):
        for group in optimizer.param_groups:
            for param in group["params"]:
                self.master.add(param)
        gradients = max(self.measured["gradients"], gradient_bytes(optimizer))  # the groups' at once, at most
        self.measured.update(gradients=gradients, master_weights=self.master.bytes)

    def _after_step(self, optimizer, args, kwargs):
        self.groups_left -= sum(1 for group in optimizer.param_groups if group["params"])  # ZeRO-3 empties the others
        if self.groups_left > 0:
            return
        self.measured.update(optimizer_states=optimizer_state_bytes(optimizer), activations=self.activations)
        self.master = StorageTally()  # its references, no longer needed
        for handle in self.handles:
            handle.remove()
        self.weight_storages, self.running_storages = {}, {}  # the references, no longer needed
        self.done = True


def error_pct(predicted: int, measured: int) -> float | None:
    if measured == 0:
        return None if predicted else 0.0
    return round(100 * (predicted - measured) / measured, 3)


class MemoryMeter:
    """This rank's measurement, and on rank 0 the prediction next to it (see the module docstring)."""

    def __init__(
        self,
        cfg,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        sharder: Strategy,
        output_dir,
        device: torch.device,
        kinds: dict[str, str],
        offload=None,
    ):
        self.cfg, self.output_dir = cfg, Path(output_dir)
        self.weights, storages = measure_weights(model, sharder, kinds)
        config = getattr(getattr(model, "module", model), "config", None)  # DDP does not pass attributes on
        image_token = config.image_token_id if config is not None and is_vision_language(config) else None
        self.probe = FirstStepProbe(model, optimizer, storages, offload, image_token)
        self.cuda = CudaPeaks(optimizer) if device.type == "cuda" else None
        self.main = not dist.is_initialized() or dist.get_rank() == 0
        world = dist.get_world_size() if dist.is_initialized() else 1
        self.hardware = Hardware(world_size=world, device=device.type)
        self.model_cache: ModelCache | None = None
        self.predicted = self._predict() if self.main else None
        measured = _gather(self.weights)
        if self.predicted:
            print(self.table(self.predicted, measured, WEIGHT_COMPONENTS, "at the start of training"), flush=True)

    def peak_device_bytes(self) -> int | None:
        """This rank's peak CUDA allocation so far (None on CPU)."""
        return self.cuda.peak_allocated() if self.cuda else None

    def _predict(self, activation_shape: tuple[int, int] | None = None, images=None) -> Budget | None:
        # The report must never stop training: a model the budget cannot predict gets a note instead.
        try:
            # The end-of-training prediction reuses the model described at the start.
            self.model_cache = self.model_cache or ModelCache(self.cfg.model)
            return predict(self.cfg, self.hardware, activation_shape, self.model_cache, images)
        except ConfigError as error:
            print(f"Memory budget: no prediction for this model ({error}); measuring only.", flush=True)
            return None

    def finish(self) -> None:
        """Gathers every rank's measurement (a collective); rank 0 prints and writes the report."""
        ranks = _gather(
            {"components": {**self.weights, **self.probe.measured}, "cuda": self.cuda.report() if self.cuda else None}
        )
        if not self.main:
            return
        measured = [r["components"] for r in ranks]
        names = [n for n in COMPONENTS if n in measured[0]]
        configured = (self.cfg.train.micro_batch_size, self.cfg.data.max_seq_len)
        shape, images = self.probe.activation_shape or configured, self.probe.activation_images
        if self.predicted and (shape != configured or images):  # a micro batch shorter than max_seq_len, or images
            self.predicted = self._predict(shape, images)
        report = {
            "schema_version": 1,
            "activation_shape": list(shape),
            "predicted": self.predicted.to_json() if self.predicted else None,
            "measured": {
                "ranks": [
                    {
                        "rank": r,
                        "components": {n: m[n] for n in names},
                        "total_bytes": sum(m[n] for n in names),
                        "cuda": ranks[r]["cuda"],
                    }
                    for r, m in enumerate(measured)
                ]
            },
            "comparison": []
            if not self.predicted
            else [
                {
                    "rank": r,
                    "component": n,
                    "predicted": self.predicted.ranks[r].held(n),
                    "measured": m[n],
                    "error_pct": error_pct(self.predicted.ranks[r].held(n), m[n]),
                }
                for r, m in enumerate(measured)
                for n in names
            ],
        }
        (self.output_dir / REPORT_JSON).write_text(json.dumps(report, indent=2))
        if not self.predicted:
            return
        print(
            self.table(
                self.predicted, measured, names, f"after the first step (micro batch {shape[0]} x {shape[1]} tokens)"
            ),
            flush=True,
        )
        if self.cuda:
            total = self.predicted.ranks[0].total_bytes - self.predicted.ranks[0].components["runtime"]
            print(
                f"torch.cuda on rank 0: peak allocated {format_bytes(ranks[0]['cuda']['peak_allocated_bytes'])}, "
                f"peak reserved {format_bytes(ranks[0]['cuda']['peak_reserved_bytes'])}; predicted total without "
                f"the runtime allowance {format_bytes(total)}.",
                flush=True,
            )
        self.plot(measured, names)

    @staticmethod
    def table(predicted: Budget, measured: list[dict[str, int]], names, when: str) -> str:
        columns = [{n: (predicted.ranks[r].held(n), m[n]) for n in names} for r, m in enumerate(measured)]
        groups = rank_groups(columns)
        header = ["component"] + [f"{g}: predicted / measured (error)" for g, _ in groups]
        rows = []
        for name in names:
            cells = []
            for _, r in groups:
                p, m = columns[r][name]
                err = error_pct(p, m)
                cells.append(f"{format_bytes(p)} / {format_bytes(m)} ({'n/a' if err is None else f'{err:+.2f}%'})")
            rows.append([name] + cells)
        return f"\nMemory per rank {when}, {predicted.strategy} on {len(measured)} rank(s):\n" + render_table(
            header, rows
        )

    def plot(self, measured: list[dict[str, int]], names) -> None:
        bars = []
        for r, m in enumerate(measured):
            bars += [
                (f"rank {r} predicted", {n: self.predicted.ranks[r].held(n) for n in names}),
                (f"rank {r} measured", {n: m[n] for n in names}),
            ]
        try:
            plot_stacked(
                self.output_dir / REPORT_PNG, bars, f"{self.predicted.strategy}: predicted vs measured per rank"
            )
        except ConfigError as missing:
            print(f"Not plotting {REPORT_PNG}: {missing}", flush=True)


def _gather(mine: dict) -> list[dict]:
    if not dist.is_initialized():
        return [mine]
    ranks = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, mine)
    return ranks
