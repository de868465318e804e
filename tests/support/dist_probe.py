"""One rank of real `launcher train` runs, with observers attached (started by accelerate launch).

    accelerate launch --config_file accelerate_configs/X.yaml tests/support/dist_probe.py PROBE_DIR -- <train args>
    accelerate launch --config_file accelerate_configs/X.yaml tests/support/dist_probe.py --runs RUNS.json

Each run is exactly `launcher.cli.main(["train", ...])`. With `--runs`, the ranks run every run of RUNS.json
([{"probe_dir": ..., "args": [...]}, ...]) in turn, in one process group, so that a test of many runs pays for
one interpreter start and one set of imports: before each run the environment `accelerate launch` gave is
restored and Accelerate's and transformers' DeepSpeed state is reset (as a fresh process starts), and all ranks
meet at a barrier; the process group lives through all runs. A run that fails ends the launch (its ranks exit, as they would alone, with its status): PROBE_DIR/started-rank<R>
says which runs began. The observers only read state and write it to PROBE_DIR/rank<R>.pt for the tests
(PROBE_DIR/pid-rank<R> holds each rank's pid while it runs):
  * before sharding: whether this rank holds any weight data yet, and (source rank) every full
    parameter and quantization constant as bytes;
  * after sharding: the bytes of every local shard with its offset, and the quantization constants;
  * before and after sharding: whether the input and output embeddings are one parameter and storage;
  * during the first optimizer step: the autograd node types of the loss and how many times each
    decoder layer's MLP ran (twice with checkpointing: once forward, once recomputed);
  * every step: the sample indices of each micro batch this rank trained on.
Fault injection, for the resume tests, through environment variables:
  PROBE_STEP_SLEEP=S            sleep S seconds after every step (so a test can act mid-run);
  PROBE_KILL_DURING_SAVE=R:N    rank R kills itself (SIGKILL) after writing its part of step N's checkpoint;
  PROBE_SKIP_RNG_RESTORE=1      resume without restoring RNG states (the negative control);
  PROBE_STALL=R:N               rank R hangs after step N, before the step boundary's collectives, writing
                                the time it stopped to PROBE_DIR/stalled (SIGTERM only sets its stop flag).
"""

import inspect
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from graph_utils import graph_node_types

from launcher import cli, strategies, train
from launcher.checkpoint import store
from launcher.run.failures import exit_rank
from launcher.strategies import handoff

RANK = int(os.environ.get("RANK", "0"))
observed: dict = {}
probe = {"dir": Path()}


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().contiguous().view(-1).view(torch.uint8).cpu().clone()


def quant_states(model) -> dict:
    """Every 4-bit linear's and 4-bit expert's quantization constants, by module name."""
    owners = set(handoff.quant_state_owners(model))
    return {
        strategies.clean_fqn(name): {k: as_bytes(v) for k, v in m.quant_state.as_dict(packed=True).items()}
        for name, m in model.named_modules()
        if m in owners
    }


def local_data(param) -> torch.Tensor:
    """The part of a (possibly sharded) parameter this rank stores."""
    if hasattr(param, "ds_tensor"):
        return param.ds_tensor
    return param.to_local() if hasattr(param, "to_local") else param


def embedding_tie(model) -> dict:
    """Whether the input and output embeddings are one parameter, and one local tensor (None on meta): the same
    local data, not only the same storage (FSDP1's parameters are views into one flat storage per unit), and not two
    empty parts (this rank holding neither)."""
    inp, out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    local = [local_data(p) for p in (inp, out)]
    same = local[0].data_ptr() == local[1].data_ptr() and local[0].numel() > 0
    return {"same_parameter": inp is out, "same_storage": None if inp.is_meta else same}


def offload_facts(model) -> dict:
    """Under which library's offload machinery the sharded parameters live, and on which device."""
    from torch.distributed.fsdp import FSDPModule

    groups = [m._get_fsdp_state()._fsdp_param_group for m in model.modules() if isinstance(m, FSDPModule)]
    params = [fsdp_param for group in groups if group for fsdp_param in group.fsdp_params]
    zero = getattr(model, "optimizer", None)
    return {
        "local_devices": sorted({local_data(p).device.type for p in model.parameters()}),
        "fsdp_policies": sorted({type(group.offload_policy).__name__ for group in groups if group}),
        "fsdp_offload_to_cpu": sorted({p.offload_to_cpu for p in params}),
        "fsdp_shard_devices": sorted({p._sharded_param_data.device.type for p in params}),
        "zero_offload_param": getattr(zero, "offload_param", None),
        "zero_offload_optimizer": getattr(zero, "offload_optimizer", None),
        # ZeRO-1/2's optimizer names its offload_optimizer flag cpu_offload (it has no offload_param).
        "zero_cpu_offload": getattr(zero, "cpu_offload", None),
    }


def observe_shard(original):
    def shard(self, model, make_optimizer, accelerator):
        observed["materialized_bytes_before_shard"] = sum(
            p.numel() * p.element_size() for p in model.parameters() if not p.is_meta
        )
        observed["tie_before_shard"] = embedding_tie(model)
        if RANK == 0:
            observed["full"] = {strategies.clean_fqn(n): as_bytes(p) for n, p in model.named_parameters()}
            observed["full_quant_states"] = quant_states(model)
        result = original(self, model, make_optimizer, accelerator)
        sharded = result[0]
        observed["shards"] = [
            (strategies.clean_fqn(s.name), s.start, s.full_numel, as_bytes(s.local), s.local.element_size())
            for s in self.local_shards(sharded)
        ]
        observed["quant_states"] = quant_states(sharded)
        observed["offload"] = offload_facts(sharded)
        observed["optimizer_type"] = type(result[2]).__name__
        observed["tie_after_shard"] = embedding_tie(accelerator.unwrap_model(sharded))
        # transformers checkpoints a decoder layer's `forward` (not `__call__`), so the recompute
        # shows as a second call of its submodules: count its first one's (a norm, or attention).
        base = accelerator.unwrap_model(sharded)
        layer_classes = set(getattr(getattr(base, "get_base_model", lambda: base)(), "_no_split_modules", ()) or ())
        for module in sharded.modules():
            if any(cls.__name__ in layer_classes for cls in type(module).__mro__):
                next(module.children()).register_forward_pre_hook(count_layer_call)
        return result

    return shard


def count_layer_call(module, args):
    observed["layer_forward_calls"] += 1


original_backward = Accelerator.backward


def backward(self, loss, **kwargs):
    observed.setdefault("loss_graph_node_types", graph_node_types(loss))
    return original_backward(self, loss, **kwargs)


original_train_step = train.train_step


def train_step(*args, **kwargs):
    named = inspect.signature(original_train_step).bind(*args, **kwargs).arguments
    result = original_train_step(*args, **kwargs)
    step, training = named["step"], named["t"]
    observed.setdefault("first_step_layer_forward_calls", observed["layer_forward_calls"])
    observed["batches"][step] = training.batches.rank_micro_batches(step, training.groups.data_rank)
    time.sleep(float(os.environ.get("PROBE_STEP_SLEEP", "0")))
    if "PROBE_STALL" in os.environ and [int(x) for x in os.environ["PROBE_STALL"].split(":")] == [RANK, step + 1]:
        (probe["dir"] / "stalled").write_text(repr(time.time()))
        while True:
            time.sleep(1)
    return result


def kill_during_save(original):
    kill_rank, kill_step = (int(x) for x in os.environ["PROBE_KILL_DURING_SAVE"].split(":"))

    def save_trainable(self, model, optimizer, directory):
        original(self, model, optimizer, directory)
        if kill_rank == RANK and store.step_name(kill_step) in str(directory):
            os.kill(os.getpid(), signal.SIGKILL)

    return save_trainable


for cls in strategies.BY_NAME.values():
    cls.shard = observe_shard(cls.shard)
    if "PROBE_KILL_DURING_SAVE" in os.environ:
        cls.save_trainable = kill_during_save(cls.save_trainable)
Accelerator.backward = backward
train.train_step = train_step
if os.environ.get("PROBE_SKIP_RNG_RESTORE") == "1":
    store.restore_rng_state = lambda state: None


def reset_between_runs(environment: dict) -> None:
    """What a new process would start with: the launch's environment (the CPU shim removes Accelerate's
    strategy flags from it), no Accelerate state, no DeepSpeed config for transformers' from_pretrained."""
    import gc

    import torch.distributed as dist
    from accelerate.state import AcceleratorState, GradientState
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    unset_hf_deepspeed_config()
    os.environ.clear()
    os.environ.update(environment)
    gc.collect()
    if dist.is_initialized():
        dist.barrier()


def run(probe_dir: Path, train_args: list[str]) -> int:
    if RANK == 0:
        print(f"dist_probe: run {probe_dir}", flush=True)  # where this run's part of a --runs launch log starts
    observed.clear()
    observed.update(layer_forward_calls=0, batches={})
    probe["dir"] = probe_dir
    probe_dir.mkdir(parents=True, exist_ok=True)
    (probe_dir / f"pid-rank{RANK}").write_text(str(os.getpid()))
    (probe_dir / f"started-rank{RANK}").touch()
    code = cli.main(["train", *train_args])
    torch.save(observed, probe_dir / f"rank{RANK}.pt")
    return code


def keep_process_group() -> None:
    """The runs share one process group: DeepSpeed keeps the groups it derives from it for the process's life,
    so `Accelerator.end_training` must not destroy it between runs (as a run does in a process of its own)."""
    from accelerate.state import PartialState

    destroy = PartialState.destroy_process_group
    PartialState.destroy_process_group = lambda self, group=None: None if group is None else destroy(self, group)


if sys.argv[1] == "--runs":
    environment = dict(os.environ)
    keep_process_group()
    for spec in json.loads(Path(sys.argv[2]).read_text()):
        reset_between_runs(environment)
        if (code := run(Path(spec["probe_dir"]), spec["args"])) != 0:
            exit_rank(code)
    exit_rank(0)
# As launcher/__main__.py ends a rank:
exit_rank(run(Path(sys.argv[1]), sys.argv[3:] if sys.argv[2] == "--" else sys.argv[2:]))
