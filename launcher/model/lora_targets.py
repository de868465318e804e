"""`lora.target_modules` resolved against the model's module tree on the meta device (no weights), the way
peft resolves it in `get_peft_model`.

Without this, a list where no name matches fails with peft's NoMatchingPeftModuleError in every rank, after
the process group has started; a list where some names match trains fewer adapters than asked, silently.
"""

from __future__ import annotations

import dataclasses
import re

from transformers import PretrainedConfig, PreTrainedModel

from ..config import ConfigError, LoraConfig, ModelConfig, QuantConfig, TrainConfig
from .build import meta_base
from .targets import describe_left_out, peft_lora_config, remapped_by_peft, resolve, resolve_all_linear


def matches(target: str, name: str) -> bool:
    """peft's rule for one name of a target list (peft.tuners.tuners_utils.check_target_module_exists)."""
    return name == target or name.endswith(f".{target}")


def pattern_matches(key: str, name: str) -> bool:
    """peft's rule for a key of `rank_pattern` / `alpha_pattern` (peft.utils.other.get_pattern_key)."""
    return re.match(rf"(.*\.)?({key})$", name) is not None


def check_patterns(lora: LoraConfig, model: ModelConfig, adapted: list[str]) -> None:
    """A ConfigError for a `rank_pattern` or `alpha_pattern` key that matches no adapted module: peft would give
    every module `r` (or `alpha`) without a word."""
    for option, pattern in (("rank_pattern", lora.rank_pattern), ("alpha_pattern", lora.alpha_pattern)):
        for key in pattern:
            try:
                found = any(pattern_matches(key, name) for name in adapted)
            except re.error as error:
                raise ConfigError(
                    f"`lora.{option}` key `{key}` is not a regular expression peft can read: {error}."
                ) from error
            if not found:
                leaves = sorted({name.rpartition(".")[2] for name in adapted})
                raise ConfigError(
                    f"`lora.{option}` names `{key}`, which matches no module this run adapts in `{model.path}` "
                    f"(adapted: {', '.join(leaves)}; a key is a module name or a regular expression matching the end "
                    "of a full name, such as `q_proj` or `layers\\.0\\.self_attn\\.q_proj`)."
                )


def meta_model_for_checks(model: ModelConfig, quant: QuantConfig, config: PretrainedConfig) -> PreTrainedModel:
    """The model's unquantized module tree on meta, as the pre-launch checks read it (module names and classes do
    not depend on the dtype, which may still be "auto" here: it is resolved on the ranks)."""
    return meta_base(model, dataclasses.replace(quant, compute_dtype="float32"), config)


def check_gradient_checkpointing(train: TrainConfig, base: PreTrainedModel) -> None:
    """A ConfigError where the run asks for gradient checkpointing and the model's class has none."""
    if train.gradient_checkpointing and not base.supports_gradient_checkpointing:
        raise ConfigError(
            f"`{type(base).__name__}` does not support gradient checkpointing, which `train.gradient_checkpointing` "
            "asks for. Set `train.gradient_checkpointing: false` (every layer's activations are then kept for "
            "backward: `qlaunch budget` says how much that is)."
        )


def check_lora_targets(lora: LoraConfig, model: ModelConfig, base: PreTrainedModel) -> None:
    """A ConfigError naming the targets that match no module, and the linear layers there are."""
    targets = lora.target_modules
    if targets != "all-linear" and not targets and not lora.target_parameters:
        raise ConfigError(
            "`lora.target_modules` is empty and there is no `lora.target_parameters`: nothing would be trained. "
            "Use all-linear, or list module names such as [q_proj, v_proj]."
        )
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as error:
            raise ConfigError(
                f"`lora.target_modules` is `{targets}`, which peft reads as a regular expression, and it does not "
                f"compile ({error}). Use all-linear, or list module names such as [q_proj, v_proj]."
            ) from error
    resolution = resolve(base, lora)
    try:
        peft_config = peft_lora_config(base, lora, resolution)
    except ValueError as error:
        raise ConfigError(
            f"`lora.target_modules` cannot be applied to `{model.path}`: {error} (peft maps the names MoE experts "
            "had before transformers 5 onto their fused parameters). Name all the parts of a fused weight, or adapt "
            "the experts through `lora.target_parameters`."
        ) from error
    if peft_config.target_parameters and peft_config.lora_dropout:
        names = ", ".join(sorted({name.rpartition(".")[2] for name in peft_config.target_parameters}))
        raise ConfigError(
            f"`lora.target_modules` names modules that `{model.path}` holds as parameters since transformers 5 "
            f"(MoE experts fused into 3D weights, the router's weight): peft adapts them as the parameters {names}, "
            f"and takes no LoRA dropout there (lora.dropout is {lora.dropout}). Move them to "
            f"`lora.target_parameters: [{names}]` (lora.dropout then applies to the modules only), or set "
            "`lora.dropout: 0`."
        )
    adapted = list(resolution.targets) + [n.rpartition(".")[0] for n in peft_config.target_parameters or ()]
    check_patterns(lora, model, adapted)
    modules = [name for name, _ in base.named_modules()]
    every = resolution if targets == "all-linear" else resolve_all_linear(base)
    linear = sorted({name.rpartition(".")[2] for name in every.targets})
    found = f"Its linear layers: {', '.join(linear)} (all-linear takes them"
    found += f"; it leaves out {describe_left_out(every.left_out)})." if every.left_out else ")."
    experts = sorted({re.sub(r"^.*?\.\d+\.", "", n) for n, p in base.named_parameters() if p.dim() == 3})
    if experts:
        found += f" Its MoE experts are 3D parameters, which `lora.target_parameters: [{', '.join(experts)}]` adapts."
    if targets == "all-linear":
        if not resolution.targets and not lora.target_parameters:
            raise ConfigError(
                f"`lora.target_modules: all-linear` finds no linear layer to adapt in `{model.path}`. {found}"
            )
        return
    if isinstance(peft_config.target_modules, str):
        if not any(re.fullmatch(targets, name) for name in modules):
            example = next((name for name in modules if name.rpartition(".")[2] in linear), modules[-1])
            raise ConfigError(
                f"`lora.target_modules` is `{targets}`, which peft reads as a regular expression over full module "
                f"names (such as `{example}`), and it matches no module of `{model.path}`. {found} List names "
                "instead, such as [q_proj, v_proj]."
            )
        return
    if isinstance(targets, str):  # a regex peft resolved to the names it matched
        return
    unmatched = [t for t in targets if not any(matches(t, n) for n in modules)]
    missing = sorted(set(unmatched) - remapped_by_peft(base, unmatched), key=unmatched.index)  # peft's expert names
    if not missing:
        return
    if len(missing) == len(targets):
        raise ConfigError(
            f"No name in `lora.target_modules` ({', '.join(targets)}) matches a module of `{model.path}`. {found}"
        )
    raise ConfigError(
        f"`lora.target_modules` names {', '.join(missing)}, which match no module of `{model.path}`: peft "
        f"would adapt the other names only, and train fewer adapters than asked. {found} Correct or drop "
        f"{'it' if len(missing) == 1 else 'them'}."
    )
