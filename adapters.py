"""LoRA adapters (Hu et al. 2022) through peft, for --lora: only low-rank adapters train; the reference is the
same model with its adapters off, and the saved model has them merged into plain weights.

    model = with_lora(model, Lora(r=8, alpha=16.0))   # W x + (alpha / r) B A x; B = 0: unchanged at first
    ref = AdaptersOff(model)                          # the base weights, without a second copy
    plain, adapter = merge_lora(model.state_dict(), Lora(8, 16.0).scale)
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from errors import UsageError
from models import meta_model


@dataclass(frozen=True)
class Lora:
    """--lora R: W x + (alpha / r) B A x on every targeted linear layer, A (r, in) and B (out, r)."""
    r: int
    alpha: float
    dropout: float = 0.0
    targets: str = "all-linear"  # peft: every nn.Linear of the model but its output layer, whatever the architecture
    seed: int = 0                # of A's random initialisation (B starts at 0)

    @property
    def scale(self) -> float:
        return self.alpha / self.r


def check_lora(name: str, lora: Lora, trust_remote_code: bool = False) -> None:
    """--lora against the model's linear layers, from its config on the meta device (no weights, no
    memory), before any work: the targets must name linear layers it has (listed when not: peft's own
    error comes only after the weights load), and the rank must not exceed min(in, out) of every
    targeted layer (B A has rank min(in, out) at most: such adapters only waste memory). A rank whose
    adapters hold more numbers than a layer itself, r (in + out) > in out, is said in one warning line."""
    model = meta_model(name, trust_remote_code)
    output = model.get_output_embeddings()
    linear = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not output}
    if lora.targets == "all-linear":
        targeted = linear
    else:
        wanted = [t.strip() for t in lora.targets.split(",")]
        matches = lambda n, t: n == t or n.endswith("." + t)  # noqa: E731  (how peft matches a target name)
        unknown = [t for t in wanted if not any(matches(n, t) for n in linear)]
        if unknown:
            valid = sorted({n.rsplit(".", 1)[-1] for n in linear})
            raise UsageError(f"--lora-targets {lora.targets}: {name} has no linear layer named {', '.join(unknown)}; "
                             f"its linear layers: {', '.join(valid)} (or all-linear)")
        targeted = {n: m for n, m in linear.items() if any(matches(n, t) for t in wanted)}
    if not targeted:
        raise UsageError(f"--lora {lora.r}: {name} has no linear layer to adapt (its output layer excepted)")
    widest_rank = max(min(m.in_features, m.out_features) for m in targeted.values())
    if lora.r > widest_rank:
        raise UsageError(f"--lora {lora.r}: above the rank of every targeted layer of {name} (at most {widest_rank}, "
                         f"the smaller of a layer's widths); pass --lora {widest_rank} or less")
    larger = [n for n, m in targeted.items() if lora.r * (m.in_features + m.out_features) > m.in_features * m.out_features]
    if larger:
        print(f"warning: --lora {lora.r}: the adapters of {len(larger)} of the {len(targeted)} targeted layers hold "
              f"more numbers than the layers themselves (e.g. {larger[0]}); a smaller rank trains less", flush=True)


def with_lora(model, lora: Lora):
    """The model with trainable LoRA adapters (B = 0 at first: the model is unchanged) and every
    other parameter frozen (peft.get_peft_model). A is drawn from its own seed, so that a stage's
    adapters do not depend on what the process drew before (another method's stage, a test)."""
    from peft import LoraConfig, get_peft_model  # optional: with --lora only
    targets = lora.targets if lora.targets == "all-linear" else [t.strip() for t in lora.targets.split(",")]
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):  # the process's own draws untouched
        # peft reads a checkpointing flag under the name transformers 5 deprecates: nothing a user can act on
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        torch.manual_seed(lora.seed)
        return get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                target_modules=targets, bias="none", task_type="CAUSAL_LM"))


def is_lora(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


class AdaptersOff(torch.nn.Module):
    """The reference model of a LoRA run: the model being trained with its adapters disabled, that is
    the base weights, which LoRA never changes; so no second copy of the weights exists. Called like
    a model (in eval mode, as frozen_copy's; the caller runs it under torch.no_grad())."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        training = self.model.training
        self.model.eval()  # dropout off, as in a frozen copy
        try:
            with self.model.disable_adapter():
                return self.model(*args, **kwargs)
        finally:
            self.model.train(training)


def merge_lora(state: dict[str, torch.Tensor], scale: float) -> tuple[dict, dict]:
    """A LoRA model's state dict as (the plain model's state dict, the adapter's tensors): each adapted
    weight W + scale * B @ A (computed in fp32, stored in W's dtype), peft's prefixes and `base_layer`
    removed, so that AutoModelForCausalLM loads the result without peft."""
    prefix, plain, adapter = "base_model.model.", {}, {}
    for key, value in state.items():
        if ".lora_" in key:
            adapter[key] = value
            continue
        name = key[len(prefix):] if key.startswith(prefix) else key
        plain[name.replace(".base_layer.", ".")] = value
    for key in [k for k in adapter if ".lora_A." in k]:
        module = key.split(".lora_A.")[0][len(prefix):]
        A, B = adapter[key], adapter[key.replace(".lora_A.", ".lora_B.")]
        W = plain[module + ".weight"]
        plain[module + ".weight"] = (W.float() + scale * (B.float() @ A.float())).to(W.dtype)
    return plain, adapter
