"""train.check_4bit_weights: a rewritten byte of packed 4-bit data is found in the first forward."""

import torch

from launcher.config import ModelConfig, QuantConfig
from launcher.cpu_shims import disable_bnb_cpu_repack
from launcher.demo import build_base_model
from launcher.dtypes import DtypePolicy
from launcher.model.build import load_quantized_base
from launcher.run.packed_check import CHUNK, PackedWeightCheck, digest


def test_digest_changes_when_a_byte_is_rewritten_or_moved():
    data = torch.randint(0, 255, (3 * CHUNK // 2 + 7,), dtype=torch.uint8)
    data[10], data[11] = 1, 2
    before = digest(data)
    swapped = data.clone()
    swapped[[10, 11]] = swapped[[11, 10]]  # same bytes, other places: the plain sum alone would miss it
    assert digest(swapped) != before and digest(swapped)[1] == before[1]
    nan_rewritten = data.clone()
    nan_rewritten[CHUNK + 3] ^= 0x40
    assert digest(nan_rewritten) != before  # in the second chunk


def test_first_forward_finds_the_weight_whose_bytes_were_rewritten(tmp_path):
    build_base_model(tmp_path / "base", layers=2, hidden=64, heads=4, kv_heads=2)
    model = load_quantized_base(
        ModelConfig(path=str(tmp_path / "base")),
        QuantConfig(compute_dtype="bfloat16"),
        DtypePolicy.uniform(torch.bfloat16),
        "cpu",
    )
    disable_bnb_cpu_repack(model)  # as training does: no in-place repacking of the weights on CPU
    ids = torch.randint(4, 200, (1, 12))

    check = PackedWeightCheck(model)
    check.watch(model)
    with torch.no_grad():
        model(input_ids=ids)
        model(input_ids=ids)
    result = check.result()
    assert result == {"checked": result["of"], "of": 14, "differing": []}  # 7 linears per layer

    # Digests taken, then one bf16 element of the packed data rewritten, as a gather that canonicalised a
    # NaN pattern would: the linear computes with other bytes than the source rank had.
    check = PackedWeightCheck(model)
    model.model.layers[1].mlp.down_proj.weight.data.view(torch.int16)[5] ^= 0x0001
    check.watch(model)
    with torch.no_grad():
        model(input_ids=ids)
    assert check.result() == {"checked": 14, "of": 14, "differing": ["model.layers.1.mlp.down_proj"]}
