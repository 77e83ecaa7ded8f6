"""The method table: each loss of flat.py with what it needs (a template answer, a retain example, a
frozen reference), its hyperparameters with their ranges and help, and how a batch's statistics map
to its arguments. Fine-tuning is a method too (FINETUNE). flat.py holds the mathematics; this
module is what the training loop (train.py) and the flags (flags.py) read about each loss.

    method = LOSSES["flat"]                    # an unknown name lists the valid ones
    method.call(stats, LossParams())           # stats: SeqStats per stream (train.batch_loss) -> (B,)
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

from torch import Tensor

import flat
from errors import Check, Choices

DIVERGENCES = Choices("divergence", flat.DIVERGENCES)  # flat's table, with lookups that list the valid names

# Ranges within which the first unlearning step is finite in float32 whatever the model (derived here,
# tested at their edges in tests/test_flat.py::test_loss_setting_ranges_are_where_the_first_step_is_finite).
# A setting enters a loss as a float32 factor, so above F32 it is inf. At the first step the model
# equals its reference, so NPO's and DPO's log-ratios are exactly 0 and their loss is (2/beta) ln 2:
# 2/beta itself must be a float32 number, beta >= 2/F32. SimNPO's is (2/beta) softplus(beta |logp| +
# delta), with 2/beta too. A weight times the KL term (exactly 0 at the first step) is inf * 0 = NaN
# above F32; a weight times a term |t| > 1 overflows sooner (w |t| > F32), which depends on the model
# and is caught at that step (train.check_finite names the loss settings).
F32 = 3.4028234663852886e38  # torch.finfo(torch.float32).max
INVERSE_TEMPERATURE = Check(lambda v: 2 / F32 <= v <= F32, "in [5.9e-39, 3.4e38] (2/beta and beta float32 numbers)")
WEIGHT = Check(lambda v: 0 <= v <= F32, "in [0, 3.4e38] (>= 0: a negative weight flips its term; a float32 number)")


def _param(default, help: str, valid: Check | None = None):
    """A loss hyperparameter: its default, its help, and its valid range, checked with every other
    flag before any work (flags.validate); non-finite numbers always fail."""
    return field(default=default, metadata={"help": help, "check": valid})


@dataclass
class LossParams:
    """Hyperparameters of the losses. The runners' flag dataclasses extend this one, so each field
    is a flag of the same name with this help text (--divergence, --beta, ...) and range."""
    divergence: str = _param("kl", "flat: FLAT's f-divergence, a key of flat.DIVERGENCES")
    beta: float = _param(0.1, "dpo, npo: inverse temperature beta (> 0: the loss is (2/beta) log sigma(beta "
                              "...); beta < 0 would prefer the forget answer)", INVERSE_TEMPERATURE)
    simnpo_beta: float = _param(2.5, "simnpo: beta (SimNPO paper, TOFU setting; > 0, as for npo)", INVERSE_TEMPERATURE)
    simnpo_delta: float = _param(0.0, "simnpo: reward margin (any float32 number)",
                                 Check(lambda v: abs(v) <= F32, "in [-3.4e38, 3.4e38] (a float32 number)"))
    retain_weight: float = _param(1.0, "weight of the retain term in gd, kl, idk (npo, simnpo with --npo-retain); "
                                       ">= 0: a negative weight would make the retain term a second forget term",
                                  WEIGHT)
    npo_retain: bool = _param(False, "npo, simnpo: add the retain NLL (NPO+RT)")
    eps1: float = _param(0.5, "llmu: weight of gradient ascent on the forget answers (>= 0: Yao et al.'s "
                              "weights only scale their terms; a negative one flips it)", WEIGHT)
    eps2: float = _param(1.0, "llmu: weight of the random-answer (mismatch) NLL (>= 0)", WEIGHT)
    eps3: float = _param(1.0, "llmu: weight of the KL to the original model on normal data (>= 0)", WEIGHT)


@dataclass(frozen=True)
class Method:
    """A loss and what it needs. `call(stats, params)` maps the batch statistics to the loss.

    stats keys: "forget", "template", "retain" (SeqStats of those answers under the model),
    "ref_forget", "ref_template" (SeqStats under the frozen reference), "retain_kl" ((B,) tensor),
    "answer" (fine-tuning rows).
    """
    call: Callable[[dict, LossParams], Tensor] | None
    params: tuple = ()             # the LossParams fields `call` reads (a stage's key holds exactly these)
    template: str | None = None    # a second answer y_e to each forget question: "refusal" (a template
    #                                such as "I don't know"), "random" (a random answer of the normal data)
    #                                or "safe" (the pair's own safe response: dpo-safe)
    retain: bool = False           # a retain (normal) example paired with each forget example
    reference: tuple = ()          # streams a frozen copy of the model before unlearning must score
    optional_retain: bool = False  # uses a retain example when params.npo_retain is set
    name: str = ""                 # its key in LOSSES (stage keys and logs name it)
    answers: str | None = None     # fine-tuning methods: whose answers the "answer" rows hold ("safe": the
    #                                forget prompts' safe responses; "normal": the normal data's)
    help: str = ""                 # an alignment baseline's line in --help

    def needs_retain(self, params: LossParams) -> bool:
        return self.retain or (self.optional_retain and params.npo_retain)

    def read_params(self, params: LossParams) -> dict:
        """The values of the hyperparameters this method reads (the retain weight of npo and simnpo only
        with --npo-retain: without a retain term they never read it)."""
        unread = {"retain_weight"} if self.optional_retain and not params.npo_retain else set()
        return {name: getattr(params, name) for name in self.params if name not in unread}


def _retain_or_none(s: dict, p: LossParams) -> Tensor | None:
    return s["retain"].logp_mean if p.npo_retain else None


_RETAINED = ("npo_retain", "retain_weight")
_LOSSES = {
    "flat": Method(lambda s, p: flat.flat_loss(p_forget=s["forget"].prob_mean, p_template=s["template"].prob_mean,
                                               divergence=p.divergence),
                   params=("divergence",), template="refusal"),
    "ga": Method(lambda s, p: flat.ga_loss(s["forget"].logp_mean)),
    "gd": Method(lambda s, p: flat.gd_loss(s["forget"].logp_mean, s["retain"].logp_mean, p.retain_weight),
                 params=("retain_weight",), retain=True),
    "kl": Method(lambda s, p: flat.kl_loss(s["forget"].logp_mean, s["retain_kl"], p.retain_weight),
                 params=("retain_weight",), retain=True, reference=("retain",)),
    "idk": Method(lambda s, p: flat.idk_loss(s["template"].logp_mean, s["retain"].logp_mean, p.retain_weight),
                  params=("retain_weight",), template="refusal", retain=True),
    "dpo": Method(lambda s, p: flat.dpo_loss(s["template"].logp_sum, s["forget"].logp_sum,
                                             s["ref_template"].logp_sum, s["ref_forget"].logp_sum, p.beta),
                  params=("beta",), template="refusal", reference=("forget", "template")),
    "npo": Method(lambda s, p: flat.npo_loss(s["forget"].logp_sum, s["ref_forget"].logp_sum, p.beta,
                                             _retain_or_none(s, p), p.retain_weight),
                  params=("beta", *_RETAINED), reference=("forget",), optional_retain=True),
    "simnpo": Method(lambda s, p: flat.simnpo_loss(s["forget"].logp_mean, p.simnpo_beta, p.simnpo_delta,
                                                   _retain_or_none(s, p), p.retain_weight),
                     params=("simnpo_beta", "simnpo_delta", *_RETAINED), optional_retain=True),
    # Yao et al.'s L_rdn: the forget prompt answered with a random answer of the normal data (the
    # "template" stream holds it); the "retain" examples are the normal data the KL term is taken on.
    "llmu": Method(lambda s, p: flat.llmu_loss(s["forget"].logp_mean, s["template"].logp_mean, s["retain_kl"],
                                               p.eps1, p.eps2, p.eps3),
                   params=("eps1", "eps2", "eps3"), template="random", retain=True, reference=("retain",)),
}
LOSSES = Choices("loss", {name: replace(m, name=name) for name, m in _LOSSES.items()})

# Fine-tuning as a method: the mean answer-token NLL of the "answer" rows (data.finetune_epoch).
FINETUNE = Method(lambda s, p: -s["answer"].logp_mean, name="finetune")

# Yao et al.'s alignment baselines (run_harmful --task harmful; docs/harmful.md): what unlearning is
# compared with, each trained from the same original model on the same prompts, with the data it needs
# that unlearning does without. rlhf is trl's two loops, not this project's (alignment.py): call=None.
ALIGNMENT = Choices("alignment baseline", {name: replace(m, name=name) for name, m in {
    "sft": replace(FINETUNE, answers="safe",
                   help="fine-tune on the safe responses to the forget prompts (positive examples)"),
    "sft-normal": replace(FINETUNE, answers="normal",
                          help="fine-tune on the normal data, TruthfulQA's training part (Yao et al.'s "
                               "'fine-tuning on the remaining data')"),
    "dpo-safe": replace(_LOSSES["dpo"], template="safe",
                        help="DPO with each forget pair's safe response preferred to its harmful one, the "
                             "original as reference (preference pairs)"),
    "rlhf": Method(None, help="a reward model (trl's RewardTrainer) on preference pairs of held-out prompts, "
                              "then RLOO (trl's RLOOTrainer) against it on the forget prompts"),
}.items()})
WITH_ALIGNMENT = Choices("method", {**LOSSES, **ALIGNMENT})  # --method of run_harmful --task harmful
