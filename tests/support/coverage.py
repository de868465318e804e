"""What happens to each causal-LM family transformers ships, walked through what runs before and around training.

Per family (its config class shrunk: support/tiny_configs.py), with the default run config:
  * targets: `all-linear` resolved and checked on the meta model as `qlaunch train` does before launch;
  * budget: the meta skeleton every rank without weights builds (4-bit layout, k-bit preparation, peft's LoRA)
    and the per-rank prediction of `qlaunch budget`;
  * loss: one forward and backward of the tiny model on the CPU, k-bit prepared (without checkpointing), LoRA
    attached, with the model's own loss, then with the chunked loss where it stands in (its loss and every gradient must equal
    the model's own), or the reason the model keeps its own.
The outcome is "ok" (it trains), "refused" (before launch, with the reason), "fails" (the ranks would fail:
the error), or "not built" (no small config of the family builds: the reason).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re
import warnings
from dataclasses import dataclass

import torch

from launcher.config import ConfigError, DataConfig, LoraConfig, ModelConfig, RunConfig, TrainConfig
from support.tiny_configs import TinyConfigError, tiny_config

STATUSES = ("ok", "refused", "fails", "not built")


@dataclass
class Outcome:
    family: str
    status: str
    reason: str = ""
    loss: str = ""
    """chunked, or why the model keeps its own loss."""
    budget: str = ""
    """predicted, or why there is no prediction."""

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def walk(family: str) -> Outcome:
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            config = tiny_config(family)
        except TinyConfigError as error:
            return Outcome(family, "not built", str(error))
        # Sequences within the tiny configs' 256 positions (learned position tables are that long).
        cfg = RunConfig(
            model=ModelConfig(path=family),
            lora=LoraConfig(dropout=0.0),
            data=DataConfig(max_seq_len=128),
            train=TrainConfig(loss_chunk_tokens=64),
            strategy="fsdp2",
        )
        try:
            runs_as_shrunk(config)
        except TinyConfigError as error:
            return Outcome(family, "not built", str(error).splitlines()[0][:200])
        try:
            check_targets(cfg, config)
        except ConfigError as error:
            return Outcome(family, "refused", str(error))
        try:
            budget = predict_budget(cfg, config)
            loss = compare_losses(cfg, config)
        except Exception as error:  # noqa: BLE001 - whatever a rank would fail with is the finding
            return Outcome(family, "fails", _first_line(error))
    status = "fails" if loss.startswith("differs") else "ok"
    return Outcome(family, status, loss if status == "fails" else "", loss, budget)


def _first_line(error: Exception) -> str:
    """The error's first line, with the sets it prints in a stable order (their order changes from run to run)."""
    line = f"{type(error).__name__}: {str(error).splitlines()[0]}"
    line = re.sub(r"\{('[^{}]*')\}", lambda m: "{" + ", ".join(sorted(m.group(1).split(", "))) + "}", line)
    return line[:200]


def check_targets(cfg: RunConfig, config) -> None:
    """What `qlaunch train` checks on the meta model before launch."""
    from launcher.model.lora_targets import check_gradient_checkpointing, check_lora_targets, meta_model_for_checks

    base = meta_model_for_checks(cfg.model, cfg.quant, config)
    check_gradient_checkpointing(cfg.train, base)
    check_lora_targets(cfg.lora, cfg.model, base)


def predict_budget(cfg: RunConfig, config) -> str:
    from launcher.memory.predict import Hardware, predict
    from launcher.memory.skeleton import ModelCache

    try:
        predict(cfg, Hardware(world_size=2), cache=ModelCache(cfg.model, config))
    except ConfigError as error:
        return f"no prediction: {error}"
    return "predicted"


def compare_losses(cfg: RunConfig, config) -> str:
    """Whether the chunked loss stands in for the model's own, and equals it (loss and every gradient)."""

    from launcher.dtypes import DtypePolicy
    from launcher.model.build import attach_lora, prepare_for_kbit_training
    from launcher.model.loss import chunking_refusal, install_loss

    model, ids, labels = _tiny(config)
    policy = DtypePolicy.uniform(torch.float32)
    # Without checkpointing (it changes no loss and no gradient, and costs each backward a forward): the matrix and
    # bench/family_sweep.py train every family with it.
    prepare_for_kbit_training(model, policy, gradient_checkpointing=False)
    peft_model = attach_lora(model, cfg.lora, policy, seed=0)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero, where the adapters' gradients of A would be zero too
            torch.nn.init.normal_(param, std=0.02)
    own, own_grads = _loss_and_grads(peft_model, ids, labels)
    if reason := chunking_refusal(model):
        return f"own: {reason}"
    install_loss(model, chunk_tokens=7, max_tokens=ids.numel())
    loss, grads = _loss_and_grads(peft_model, ids, labels)
    worst = max([abs(loss - own) / own.abs()] + [_relative(grads[n], g) for n, g in own_grads.items()])
    return "chunked" if worst <= 1e-4 and grads.keys() == own_grads.keys() else f"differs: relative error {worst:.1e}"


def _tiny(config):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).train()
    ids = torch.randint(3, config.get_text_config().vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :5] = -100
    return model, ids, labels


def runs_as_shrunk(config) -> None:
    """A TinyConfigError where the shrunk model does not train as transformers builds it, before anything of ours."""
    try:
        _loss_and_grads(*_tiny(config))
    except Exception as error:  # noqa: BLE001 - any failure here is the shrinking's or the family's
        raise TinyConfigError(f"the shrunk model does not run: {type(error).__name__}: {error}") from error


def _loss_and_grads(model, ids, labels):
    torch.manual_seed(2)  # the same dropout masks for the model's own loss and the chunked one
    model.zero_grad()
    loss = model(input_ids=ids, labels=labels, use_cache=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()
