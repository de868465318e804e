"""Checks on what dist_probe.py recorded of each rank's shards after sharding."""

from collections import defaultdict

import torch

BASE_SHARDED = {"fsdp2", "fsdp1", "zero3"}


def assert_shards_are_rank0s_bytes(probes: list[dict], strategy: str) -> None:
    """Every rank's shard is rank 0's bytes (packed 4-bit data and quantization constants included), every
    element is held once where the strategy shards the base (on every rank where it does not), and no
    rank holds more than its share."""
    world = len(probes)
    full = probes[0]["full"]
    covered = defaultdict(int)
    total_bytes = sum(t.numel() for t in full.values())
    for rank, probe in enumerate(probes):
        held_bytes = 0
        for name, start, full_numel, local, element_size in probe["shards"]:
            expected = full[name]
            assert expected.numel() == full_numel * element_size, name
            valid = max(0, min(local.numel() // element_size, full_numel - start))
            got = local[: valid * element_size]
            want = expected[start * element_size : (start + valid) * element_size]
            assert torch.equal(got, want), f"rank {rank}: {name} differs from rank 0's weights"
            covered[name] += valid
            held_bytes += valid * element_size
            # FSDP2 and ZeRO-3 split every tensor; FSDP1 splits each flattened unit as a whole.
            if strategy in ("fsdp2", "zero3") and full_numel >= world * 64:
                assert valid < full_numel, f"rank {rank} holds all of {name}"
        if strategy in BASE_SHARDED:
            assert held_bytes <= 1.05 * total_bytes / world, (rank, held_bytes, total_bytes)
        assert probe["quant_states"].keys() == probes[0]["full_quant_states"].keys()
        for module, states in probe["quant_states"].items():
            for key, value in states.items():
                assert torch.equal(value, probes[0]["full_quant_states"][module][key]), (rank, module, key)
    copies = 1 if strategy in BASE_SHARDED else world
    numel_of = {shard[0]: shard[2] for probe in probes for shard in probe["shards"]}
    assert numel_of.keys() == full.keys()
    for name in full:
        assert covered[name] == copies * numel_of[name], name
