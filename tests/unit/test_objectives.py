"""The preference objectives against TRL's own code (trl 1.16, a test-only dependency), in process.

The same LoRA model twice (one family with tied embeddings, one MoE): ours computes each sequence's log-probability
through the chunked loss and the DPO reference with the adapter switched off; TRL's runs its fused LM head and its
trainers' loss code (DPOTrainer._compute_loss for sigmoid, ipo and hinge; CPOTrainer.cpo_loss for simpo;
ORPOTrainer's log-probabilities and odds_ratio_loss for ORPO; KTOTrainer._compute_loss for KTO) on the same batch.
Losses, TRL's metrics and the adapter's gradients must agree. Then the data: TRL's three pair forms, prompt
truncation, KTO's labelled completions, refusals.
"""

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from launcher.config import ConfigError, DataConfig, RunConfig, TrainConfig
from launcher.data.batches import Rows
from launcher.data.tokenized import load_tokenized
from launcher.model.loss import install_loss
from launcher.objective_config import DPOConfig, KTOConfig, ORPOConfig
from launcher.objectives import ModelCalls, get
from support.families import TURNS_TEMPLATE
from support.pairs import write_pairs, write_unpaired

FAMILIES = ["llama-tied", "qwen3-moe"]
MAX_SEQ_LEN = 48
SAMPLES = [0, 1, 2]


class OneProcess:
    """What TRL's loss code asks of its Accelerator, for one process."""

    device = torch.device("cpu")

    @staticmethod
    def unwrap_model(model):
        return model

    @staticmethod
    def gather(tensor):
        return tensor

    gather_for_metrics = gather

    @staticmethod
    def reduce(tensor, op):
        return tensor


def lora_model(base, fused: bool):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if fused:
        add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    else:
        install_loss(model, 8, 2 * len(SAMPLES) * MAX_SEQ_LEN)  # 8 tokens a chunk: many chunks per sequence
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    return get_peft_model(model, config).train()


@pytest.fixture(scope="module", params=FAMILIES)
def setup(request, family_assets, tmp_path_factory):
    """(ours, theirs, batch): the same adapter weights (B not zero, so the adapter matters) and a batch of pairs."""
    from transformers import AutoTokenizer

    base = family_assets(request.param) / "base"
    root = tmp_path_factory.mktemp(f"pairs-{request.param}")
    torch.manual_seed(0)  # peft draws A from the global generator: the same model whatever ran before
    ours, theirs = lora_model(base, fused=False), lora_model(base, fused=True)
    with torch.no_grad():
        for name, param in ours.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    theirs.load_state_dict(ours.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(base)
    data_cfg = DataConfig(path=str(write_pairs(root / "pairs.jsonl", 8)), max_seq_len=MAX_SEQ_LEN, cache_dir=str(root))
    data, _ = load_tokenized(data_cfg, tokenizer, 0, "dpo")
    rows = Rows(data, False, MAX_SEQ_LEN)
    unpaired_cfg = DataConfig(
        path=str(write_unpaired(root / "unpaired.jsonl", 8)), max_seq_len=MAX_SEQ_LEN, cache_dir=str(root)
    )
    unpaired = Rows(load_tokenized(unpaired_cfg, tokenizer, 0, "kto")[0], False, MAX_SEQ_LEN)
    return SimpleNamespace(ours=ours, theirs=theirs, rows=rows, unpaired=unpaired, pad_id=tokenizer.pad_token_id)


def ours_loss(model, rows, pad_id, objective: str, backward: bool = True, **options):
    cfg = RunConfig(
        train=TrainConfig(objective=objective),
        dpo=DPOConfig(**options) if objective == "dpo" else DPOConfig(),
        orpo=ORPOConfig(**options) if objective == "orpo" else ORPOConfig(),
        kto=KTOConfig(**options) if objective == "kto" else KTOConfig(),
    )
    chosen = get(cfg)
    chosen.begin(ModelCalls(model, model), OneProcess(), rows, [SAMPLES], pad_id)
    batch = chosen.collate(rows, SAMPLES, pad_id)
    totals = chosen.totals(rows, SAMPLES)
    model.zero_grad()
    loss, sums = chosen.loss(ModelCalls(model, model), batch, totals)
    if backward:
        loss.backward()
    return loss.item(), chosen.metrics({k: v.item() for k, v in sums.items()}, totals), gradients(model), batch


def ours_kto(model, rows, pad_id, **options):
    """Ours on KTO's samples, and the batch TRL's collator would make of them: each sample's completion and its
    mismatched one (the same ones ours pairs it with)."""
    loss, metrics, grads, batch = ours_loss(model, rows, pad_id, "kto", **options)
    objective = get(RunConfig(train=TrainConfig(objective="kto")))
    kl = objective.reference_batch(rows, SAMPLES, pad_id)
    half = len(SAMPLES)
    inputs = {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "completion_mask": (batch["labels"] != -100).long(),
        "KL_input_ids": kl["input_ids"][half:],
        "KL_attention_mask": kl["attention_mask"][half:],
        "KL_completion_mask": (kl["labels"][half:] != -100).long(),
        "label": torch.as_tensor(rows.data.desirable[SAMPLES]),
    }
    return loss, metrics, grads, inputs


def gradients(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def assert_same(ours: dict, theirs: dict, **tolerance):
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], **tolerance, msg=name)


def trl_trainer(model, **fields) -> SimpleNamespace:
    """What TRL's trainers' loss code reads of `self`, for one process, the reference by the adapter switched off."""
    return SimpleNamespace(
        model=model,
        ref_model=None,
        accelerator=OneProcess(),
        args=SimpleNamespace(gradient_checkpointing_kwargs=None),
        aux_loss_enabled=False,
        precompute_ref_logps=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
        **fields,
    )


def trl_dpo_loss(model, batch, loss_type: str, beta: float):
    from trl import DPOTrainer

    trainer = trl_trainer(
        model,
        ld_alpha=None,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=0.0,
        use_weighting=False,
    )
    inputs = {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "completion_mask": (batch["labels"] != -100).long(),
    }
    model.zero_grad()
    loss = DPOTrainer._compute_loss(trainer, model, inputs, False)
    loss.backward()
    return loss.item(), {k: v[-1] for k, v in trainer._metrics["train"].items()}, gradients(model)


def trl_kto_loss(model, inputs, beta: float, desirable_weight: float, undesirable_weight: float):
    from trl import KTOTrainer

    trainer = trl_trainer(
        model,
        calculate_KL=True,
        loss_type="kto",
        beta=beta,
        desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight,
    )
    trainer._compute_kl_logps = lambda model, batch: KTOTrainer._compute_kl_logps(trainer, model, batch)
    model.zero_grad()
    loss = KTOTrainer._compute_loss(trainer, model, inputs, False)
    loss.backward()
    return loss.item(), {k: v[-1] for k, v in trainer._metrics["train"].items()}, gradients(model)


def trl_logps(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sequence's summed log-probability of its completion, from TRL's fused LM head, and its token count."""
    outputs = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"], fused_lm_head=True
    )
    return outputs.log_probs.sum(1), (batch["labels"][:, 1:] != -100).sum(1)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_dpo_equals_trl(setup, loss_type):
    ours, theirs, rows, pad_id = setup.ours, setup.theirs, setup.rows, setup.pad_id
    loss, metrics, grads, batch = ours_loss(ours, rows, pad_id, "dpo", loss_type=loss_type, beta=0.5)
    their_loss, their_metrics, their_grads = trl_dpo_loss(theirs, batch, loss_type, 0.5)
    assert loss == pytest.approx(their_loss, rel=1e-4, abs=1e-6)
    for name, value in metrics.items():
        assert value == pytest.approx(their_metrics[name], rel=1e-4, abs=1e-5), name
    assert any(g.abs().sum() > 0 for g in grads.values())
    assert_same(grads, their_grads, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_simpo_equals_trl_cpo_simpo(setup, label_smoothing):
    from trl.experimental.cpo import CPOTrainer

    ours, theirs, rows, pad_id = setup.ours, setup.theirs, setup.rows, setup.pad_id
    options = dict(loss_type="simpo", beta=2.0, simpo_gamma=0.5, label_smoothing=label_smoothing)
    loss, metrics, grads, batch = ours_loss(ours, rows, pad_id, "dpo", **options)
    trainer = SimpleNamespace(
        alpha=0.0,
        loss_type="simpo",
        beta=2.0,
        simpo_gamma=0.5,
        label_smoothing=label_smoothing,
        accelerator=OneProcess(),
    )
    theirs.zero_grad()
    logps, tokens = trl_logps(theirs, batch)
    chosen, rejected = (logps / tokens).chunk(2)
    losses, chosen_rewards, rejected_rewards = CPOTrainer.cpo_loss(trainer, chosen, rejected)
    losses.mean().backward()
    assert loss > 1e-3, loss  # not saturated: the comparison means something
    assert loss == pytest.approx(losses.mean().item(), rel=1e-4, abs=1e-6)
    assert metrics["rewards/chosen"] == pytest.approx(chosen_rewards.mean().item(), rel=1e-4)
    assert metrics["rewards/margins"] == pytest.approx((chosen_rewards - rejected_rewards).mean().item(), rel=1e-4)
    assert_same(grads, gradients(theirs), rtol=1e-3, atol=1e-6)


def test_orpo_equals_trl(setup):
    from trl.experimental.orpo import ORPOTrainer

    ours, theirs, rows, pad_id = setup.ours, setup.theirs, setup.rows, setup.pad_id
    loss, metrics, grads, batch = ours_loss(ours, rows, pad_id, "orpo", beta=0.2)
    theirs.zero_grad()
    logits = theirs(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"]
    logps = ORPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)
    chosen, rejected = logps.chunk(2)
    half = len(SAMPLES)
    # ORPOTrainer.concatenated_forward's NLL: cross-entropy of the chosen half, shifted, over its completion tokens.
    nll = F.cross_entropy(logits[:half, :-1].flatten(0, 1), labels[:half, 1:].flatten(), ignore_index=-100)
    trainer = SimpleNamespace(beta=0.2, accelerator=OneProcess())
    losses, chosen_rewards, _, log_odds_ratio, log_odds_chosen = ORPOTrainer.odds_ratio_loss(trainer, chosen, rejected)
    (nll - losses.mean()).backward()
    assert loss == pytest.approx((nll - losses.mean()).item(), rel=1e-4)
    assert metrics["nll_loss"] == pytest.approx(nll.item(), rel=1e-4)
    assert metrics["log_odds_ratio"] == pytest.approx(log_odds_ratio.item(), rel=1e-4)
    assert metrics["log_odds_chosen"] == pytest.approx(log_odds_chosen.item(), rel=1e-4, abs=1e-6)
    assert metrics["rewards/chosen"] == pytest.approx(chosen_rewards.mean().item(), rel=1e-4)
    assert_same(grads, gradients(theirs), rtol=1e-3, atol=1e-6)


def test_the_reference_is_the_base_with_the_adapter_off(setup):
    """Where the adapter is off, DPO's reference equals the policy: the log ratios, rewards and margins are 0 and
    the sigmoid loss is log 2."""
    ours, rows, pad_id = setup.ours, setup.rows, setup.pad_id
    with ours.disable_adapter():
        loss, metrics, _, _ = ours_loss(ours, rows, pad_id, "dpo", backward=False, loss_type="sigmoid")
    assert loss == pytest.approx(0.6931472, rel=1e-5)
    assert metrics["rewards/margins"] == pytest.approx(0.0, abs=1e-6)


@pytest.fixture
def kto_setup(setup):
    """The adapter trained a few steps toward KTO's completions, so that the policy gives every completion more
    than the reference does and the KL term is positive (a random adapter's is clamped to 0); restored after."""
    before = {name: p.detach().clone() for name, p in setup.ours.named_parameters() if p.requires_grad}
    calls = ModelCalls(setup.ours, setup.ours)
    batch = get(RunConfig(train=TrainConfig(objective="kto"))).reference_batch(setup.unpaired, SAMPLES, setup.pad_id)
    optimizer = torch.optim.Adam([p for p in setup.ours.parameters() if p.requires_grad], lr=0.01)
    for _ in range(3):
        optimizer.zero_grad()
        (-calls.sequence_logps(batch).sum()).backward()
        optimizer.step()
    setup.theirs.load_state_dict(setup.ours.state_dict())
    yield setup
    with torch.no_grad():
        for name, p in setup.ours.named_parameters():
            if name in before:
                p.copy_(before[name])
    setup.theirs.load_state_dict(setup.ours.state_dict())


@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.0, 1.5)])
def test_kto_equals_trl(kto_setup, weights):
    setup = kto_setup
    options = dict(beta=0.5, desirable_weight=weights[0], undesirable_weight=weights[1])
    loss, metrics, grads, inputs = ours_kto(setup.ours, setup.unpaired, setup.pad_id, **options)
    their_loss, their_metrics, their_grads = trl_kto_loss(setup.theirs, inputs, **options)
    assert 0 < int(inputs["label"].sum()) < len(SAMPLES), "both kinds of completion in the batch"
    assert metrics["kl"] > 1e-4, "the KL term is not clamped away: the comparison covers it"
    assert loss == pytest.approx(their_loss, rel=1e-4, abs=1e-6)
    for name, value in metrics.items():
        assert value == pytest.approx(their_metrics[name], rel=1e-4, abs=1e-5), name
    assert_same(grads, their_grads, rtol=1e-3, atol=1e-6)


# --- Pair data --------------------------------------------------------------------------------------------------


def tokenized_pairs(tmp_path, family_assets, form: str, **data):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(family_assets("llama") / "base")
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = write_pairs(tmp_path / f"{form}.jsonl", 4, form=form)
    options = dict(max_seq_len=MAX_SEQ_LEN, cache_dir=str(tmp_path / "cache"), chat_template=TURNS_TEMPLATE, **data)
    data, _ = load_tokenized(DataConfig(path=str(path), **options), tokenizer, 0, "dpo")
    return data, tokenizer


@pytest.mark.parametrize("form", ["text", "chat", "implicit"])
def test_pairs_in_trl_s_forms_put_the_loss_on_each_completion(tmp_path, family_assets, form):
    data, tokenizer = tokenized_pairs(tmp_path, family_assets, form)
    for i in range(len(data)):
        (chosen, chosen_labels), (rejected, rejected_labels) = data.sample(i), data.rejected(i)
        prompt = next(k for k, label in enumerate(chosen_labels) if label != -100)
        assert chosen[:prompt] == rejected[:prompt], "both sequences start with the same prompt"
        assert all(label == -100 for label in rejected_labels[:prompt])
        said = [
            tokenizer.decode([t for t, label in zip(ids, labels, strict=True) if label != -100])
            for ids, labels in ((chosen, chosen_labels), (rejected, rejected_labels))
        ]
        assert said[0] != said[1] and all(text.strip().startswith("t") for text in said)


def test_a_long_prompt_keeps_its_last_tokens(tmp_path, family_assets):
    whole, _ = tokenized_pairs(tmp_path / "whole", family_assets, "text")
    cut, _ = tokenized_pairs(tmp_path / "cut", family_assets, "text", max_prompt_len=3)
    (ids, labels), (cut_ids, cut_labels) = whole.sample(0), cut.sample(0)
    prompt = next(k for k, label in enumerate(labels) if label != -100)
    assert prompt > 3 and cut_ids == ids[prompt - 3 :] and cut_labels == labels[prompt - 3 :]


@pytest.mark.parametrize(
    "record, message",
    [
        ({"prompt": "t1 t8", "chosen": "", "rejected": " t3"}, "`chosen` is missing or empty"),
        ({"prompt": "t1 t8", "chosen": " t15", "rejected": None}, "`rejected` is missing or empty"),
        ({"prompt": " ".join(["t1"] * 60), "chosen": " t15", "rejected": " t3"}, "leaves no room for a completion"),
        ({"chosen": "t1 t8", "rejected": "t1 t8"}, "must share a prompt at the start and then differ"),
    ],
)
def test_a_bad_pair_is_refused_naming_its_record(tmp_path, family_assets, record, message):
    import json

    from transformers import AutoTokenizer

    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "t1", "chosen": " t8", "rejected": " t2"}) + "\n" + json.dumps(record) + "\n")
    tokenizer = AutoTokenizer.from_pretrained(family_assets("llama") / "base")
    with pytest.raises(ConfigError, match=message) as error:
        load_tokenized(
            DataConfig(path=str(path), max_seq_len=MAX_SEQ_LEN, cache_dir=str(tmp_path)), tokenizer, 0, "dpo"
        )
    assert "record 1" in str(error.value)


# --- KTO's data ---------------------------------------------------------------------------------------------------


def tokenized_for_kto(tmp_path, family_assets, lines: list[dict]):
    import json

    from transformers import AutoTokenizer

    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    tokenizer = AutoTokenizer.from_pretrained(family_assets("llama") / "base")
    config = DataConfig(path=str(path), max_seq_len=MAX_SEQ_LEN, cache_dir=str(tmp_path / "cache"))
    return load_tokenized(config, tokenizer, 0, "kto")[0], tokenizer


def completion_text(data, i: int, tokenizer) -> str:
    ids, labels = data.sample(i)
    return tokenizer.decode(
        [t for t, label in zip(ids, labels, strict=True) if label != -100], skip_special_tokens=True
    )


def test_kto_takes_labelled_completions_and_splits_pairs(tmp_path, family_assets):
    unpaired = [
        {"prompt": "t1 t8", "completion": " t3 t5", "label": True},
        {"prompt": "t2 t9", "completion": " t200", "label": False},
    ]
    data, tokenizer = tokenized_for_kto(tmp_path / "unpaired", family_assets, unpaired)
    assert data.desirable.tolist() == [True, False]
    assert completion_text(data, 0, tokenizer).split()[:2] == ["t3", "t5"]
    pairs, tokenizer = tokenized_for_kto(
        tmp_path / "pairs", family_assets, [{"prompt": "t1", "chosen": " t8", "rejected": " t210"}]
    )
    assert pairs.desirable.tolist() == [True, False], "a pair is its chosen completion, desirable, and its rejected one"
    assert [completion_text(pairs, i, tokenizer).split()[0] for i in range(2)] == ["t8", "t210"]


@pytest.mark.parametrize("label", ["yes", 1, None])
def test_a_label_that_is_not_true_or_false_is_refused_naming_its_record(tmp_path, family_assets, label):
    lines = [
        {"prompt": "t1", "completion": " t8", "label": True},
        {"prompt": "t1", "completion": " t3", "label": label},
    ]
    with pytest.raises(ConfigError, match="record 1: `label` is .*KTO takes true") as error:
        tokenized_for_kto(tmp_path, family_assets, lines)
    assert repr(label) in str(error.value)


def test_kto_s_mismatched_completions_pair_each_prompt_with_another_sample_s(tmp_path, family_assets):
    lines = [{"prompt": f"t{10 * k}", "completion": f" t{10 * k + 1}", "label": k % 2 == 0} for k in range(6)]
    data, tokenizer = tokenized_for_kto(tmp_path, family_assets, lines)
    objective = get(RunConfig(train=TrainConfig(objective="kto")))
    rows = Rows(data, False, MAX_SEQ_LEN)
    samples = list(range(len(rows)))
    partners = objective.partner_of(rows, samples)
    assert sorted(partners) == samples and all(p != s for p, s in zip(partners, samples, strict=True))
    built = objective.mismatched(rows, samples)
    for sample, partner, (ids, labels, _) in zip(samples, partners, built, strict=True):
        prompt = tokenizer.decode(ids[labels == -100], skip_special_tokens=True).split()
        completion = tokenizer.decode(ids[labels != -100], skip_special_tokens=True).split()
        assert prompt[-1] == f"t{10 * sample}" and completion[0] == f"t{10 * partner + 1}"


def test_a_precomputed_reference_is_not_reused_for_a_changed_model_adapter_or_objective(setup, tmp_path):
    """The table is keyed by what decides its values: another model's files, another adapter continued or another
    objective read another table (computed again), never a stale one."""
    import dataclasses
    import os
    import shutil

    from launcher.config import LoraConfig, ModelConfig
    from launcher.objectives.reference import table_key

    model = tmp_path / "model"
    shutil.copytree(setup.ours.get_base_model().config.name_or_path, model)
    adapter = tmp_path / "adapter"
    setup.ours.save_pretrained(adapter)
    base = RunConfig(model=ModelConfig(path=str(model)), train=TrainConfig(objective="dpo"))
    key = table_key(base, setup.rows)
    assert table_key(base, setup.rows) == key
    weights = next(model.glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # rewritten
    changed = table_key(base, setup.rows)
    continued = table_key(dataclasses.replace(base, lora=LoraConfig(init_from=str(adapter))), setup.rows)
    kto = table_key(dataclasses.replace(base, train=TrainConfig(objective="kto")), setup.rows)
    assert len({key, changed, continued, kto}) == 4
