"""The model families fedtune trains, and which of their layers LoRA adapts under DP.

A family is a Hugging Face ``config.model_type``. Each has default LoRA targets (the attention
query and value projections, or their DeepSeek equivalents); ``lora.target_modules`` overrides
them. Targets are matched as PEFT matches them (a module's full name, or its last dotted
parts), and every named target must match at least one linear layer: a list that adapts only
part of what was meant is refused rather than trained.

Mixture-of-experts models (DeepSeek-V2/V3) keep their router and routed experts frozen. Routed
experts are fused 3-D parameters run in a data-dependent loop, for which Opacus computes no
per-example gradients, and Opacus has no per-example gradient for a trainable router; LoRA on
attention is per-example as usual. (Dense MLPs and shared experts would be too, but PEFT 0.21
re-reads the names ``gate_proj``, ``up_proj``, ``down_proj`` and ``gate`` on these models as
the routed experts' fused weights and the router -- its transformers-v4-to-v5 MoE conversion --
so they cannot be named; fedtune refuses them.) Their auxiliary
load-balancing losses couple the examples of a batch and stay out of the DP loss (fedtune's
loss is the per-example language-model loss of ``client_node/losses.py``; router logits are
not even collected, see :func:`exclude_router_outputs`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from fedtune.common.errors import FedtuneError

ALL_LINEAR = "all-linear"


class LoraTargetError(FedtuneError, ValueError):
    """``lora.target_modules`` does not fit the model (no match, a partial match, or layers
    that DP-LoRA must keep frozen)."""


def _query_value(config: Any) -> list[str]:
    return ["q_proj", "v_proj"]


def _deepseek(config: Any) -> list[str]:
    # Multi-head latent attention: the query is q_proj, or q_a_proj -> q_b_proj when the
    # query is low-rank (q_lora_rank set); kv_b_proj expands the latent into keys and values.
    query = "q_proj" if getattr(config, "q_lora_rank", None) is None else "q_b_proj"
    return [query, "kv_b_proj"]


# model_type -> default LoRA targets for that model's config.
FAMILIES: dict[str, Callable[[Any], list[str]]] = {
    "llama": _query_value,
    "qwen2": _query_value,
    "deepseek_v2": _deepseek,
    "deepseek_v3": _deepseek,
}


def default_target_modules(model: nn.Module) -> list[str]:
    """The family's default LoRA targets for ``model`` (by ``model.config.model_type``)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    family = FAMILIES.get(str(model_type))
    if family is None:
        raise LoraTargetError(
            f"fedtune has no default LoRA targets for model_type '{model_type}' (known: "
            f"{', '.join(sorted(FAMILIES))}); set lora.target_modules to some of its "
            "linear layers: "
            f"{', '.join(_linear_names(model))}"
        )
    return family(config)


def resolve_target_modules(model: nn.Module, requested: Sequence[str] | None) -> list[str]:
    """The LoRA targets to use on ``model``: ``requested`` (``None``: the family default;
    ``["all-linear"]``: every linear layer that may train), checked so that each target
    matches at least one linear layer and none is a router or a routed expert."""
    targets = default_target_modules(model) if requested is None else list(requested)
    if targets == [ALL_LINEAR]:
        targets = _linear_names(model)
    elif ALL_LINEAR in targets:
        raise LoraTargetError(f"lora.target_modules: '{ALL_LINEAR}' must stand alone")
    modules = dict(model.named_modules())
    redirects = _peft_redirects(model)
    unmatched = []
    for target in targets:
        matched = [name for name in modules if name == target or name.endswith(f".{target}")]
        for name in matched:
            role = routing_role(model, name)
            if role is not None:
                raise LoraTargetError(
                    f"lora.target_modules: '{target}' matches the {role} ({name}), which "
                    "stays frozen under DP (Opacus has no per-example gradients for it); "
                    f"adaptable layers here: {', '.join(_linear_names(model))}"
                )
        redirected = [old for old in redirects if target == old or target.endswith(f".{old}")]
        if redirected:
            raise LoraTargetError(
                f"lora.target_modules: PEFT reads '{target}' on this "
                f"{_model_type(model)} model as the mixture-of-experts weights "
                f"'{redirects[redirected[0]]}' (routed experts or router), which stay frozen "
                f"under DP; adaptable layers here: {', '.join(_linear_names(model))}"
            )
        if not matched:
            unmatched.append(target)
        for name in matched:
            if not isinstance(modules[name], nn.Linear):
                raise LoraTargetError(
                    f"lora.target_modules: '{target}' matches {name}, a "
                    f"{type(modules[name]).__name__}; name linear layers: "
                    f"{', '.join(_linear_names(model))}"
                )
    if unmatched:
        raise LoraTargetError(
            f"lora.target_modules: {', '.join(repr(t) for t in unmatched)} "
            f"match{'es' if len(unmatched) == 1 else ''} no layer of this "
            f"{_model_type(model)} model (its adaptable linear layers: "
            f"{', '.join(_linear_names(model))})"
        )
    return targets


def check_targets_adapted(peft_model: Any, targets: Sequence[str]) -> None:
    """Refuse an adapter in which PEFT adapted something other than the named layers: a
    target that adapted no layer, or weights adapted as raw parameters (PEFT's route for
    fused MoE experts)."""
    config = peft_model.peft_config[peft_model.active_adapter]
    parameters = sorted(getattr(config, "target_parameters", None) or [])
    if parameters:
        raise LoraTargetError(
            f"PEFT adapted the parameters {', '.join(parameters)} (fused mixture-of-experts "
            "weights), which stay frozen under DP"
        )
    adapted = list(peft_model.base_model.targeted_module_names)
    for target in targets:
        if not any(name == target or name.endswith(f".{target}") for name in adapted):
            raise LoraTargetError(f"lora.target_modules: PEFT adapted no layer for '{target}'")


def routing_role(model: nn.Module, name: str) -> str | None:
    """``"router"`` or ``"routed experts"`` when module ``name`` of ``model`` is part of a
    mixture-of-experts block's routing, else ``None``. A block is a module with an ``experts``
    child; its router is the sibling named ``gate`` or ``router``; shared experts (trained on
    every token) are not routing."""
    parts = name.split(".")
    if "experts" in parts:
        return "routed experts"
    if parts[-1] in ("gate", "router") and len(parts) > 1:
        parent = model.get_submodule(".".join(parts[:-1]))
        if isinstance(getattr(parent, "experts", None), nn.Module):
            return "router"
    return None


def check_routing_frozen(model: nn.Module) -> None:
    """Refuse a model in which a router or routed-expert parameter would train."""
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        module_name = name.rsplit(".", 1)[0]
        role = _role_on_path(model, module_name)
        if role is not None:
            raise LoraTargetError(
                f"parameter {name} of the {role} is trainable; under DP the router and the "
                "routed experts stay frozen"
            )


def _role_on_path(model: nn.Module, module_name: str) -> str | None:
    parts = module_name.split(".")
    for end in range(len(parts), 0, -1):
        role = routing_role(model, ".".join(parts[:end]))
        if role is not None:
            return role
    return None


def exclude_router_outputs(model: nn.Module) -> None:
    """Stop the model collecting router logits: in Mixtral-style models they add a
    load-balancing loss, which couples the examples of a batch, to ``out.loss``."""
    config = getattr(model, "config", None)
    if getattr(config, "output_router_logits", False):
        config.output_router_logits = False  # type: ignore[union-attr]


def _linear_names(model: nn.Module) -> list[str]:
    """The distinct last name parts of the linear layers LoRA may adapt (not the output
    head, the router, routed experts, or names PEFT redirects to them), in model order."""
    get_head: Any = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    redirects = _peft_redirects(model)
    names: dict[str, None] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or module is head:
            continue
        if _role_on_path(model, name) is not None:
            continue
        short = _short_name(name)
        if any(short == old or short.endswith(f".{old}") for old in redirects):
            continue
        names[short] = None
    return list(names)


def _model_type(model: nn.Module) -> str:
    return str(getattr(getattr(model, "config", None), "model_type", "?"))


def _peft_redirects(model: nn.Module) -> dict[str, str]:
    """Target names that PEFT, on this model type, maps to fused MoE weights or the router
    (``{"gate_proj": "gate_up_proj", ...}``): PEFT's own table, read where it keeps it."""
    try:
        from peft.utils.transformers_weight_conversion import (
            _MODEL_TO_CONVERSION_PATTERN,
            _MOE_TARGET_MODULE_MAPPING,
        )
    except ImportError:  # another PEFT: check_targets_adapted still catches a redirect
        return {}
    pattern = _MODEL_TO_CONVERSION_PATTERN.get(_model_type(model))
    return dict(_MOE_TARGET_MODULE_MAPPING.get(str(pattern), {}))


def _short_name(name: str) -> str:
    """``shared_experts.up_proj`` for a shared expert's layer (so that it does not also name
    the dense MLP's ``up_proj``), else the last part."""
    parts = name.split(".")
    if len(parts) > 1 and parts[-2].startswith("shared_expert"):
        return ".".join(parts[-2:])
    return parts[-1]
