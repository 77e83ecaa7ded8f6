"""Unlearning losses as pure functions of tensors, in the order of the FLAT paper: the statistic P,
FLAT's loss and its divergence table, then the baselines; the numerical machinery last.

Every loss takes per-sample statistics of answer tokens (log-probabilities, mean token
probabilities, KL to a reference) and returns a per-sample loss of shape (B,) to *minimise*; the
caller takes the mean. None of them takes a model, a batch dict or a device, so each can be copied
into other code and tested on random tensors.

    logits, labels  --sequence_stats-->  SeqStats(logp_sum, logp_mean, prob_mean, n_tokens)  (B,) each
    SeqStats of the forget / template / retain answers  --a loss-->  (B,)

FLAT: Wang et al., "LLM Unlearning via Loss Adjustment with Only Forget Data", ICLR 2025.
LLMU: Yao, Xu, Liu, "Large Language Model Unlearning", NeurIPS 2024.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100  # label of tokens that are not scored (question, padding)


# ---------------------------------------------------------------------------------------------
# P: per-token and per-sample statistics, the one log-prob helper every loss and metric uses.
# ---------------------------------------------------------------------------------------------

def shift_labels(labels: Tensor) -> tuple[Tensor, Tensor]:
    """Next-token targets aligned with the logits that predict them, and the mask of scored ones.

    Shape: labels (B, T). Returns target (B, T) with target[:, t] = labels[:, t+1] (IGNORE_INDEX at
    the last position) and mask (B, T) bool. Shifting labels, not logits, keeps the logits contiguous.
    """
    target = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    return target, target != IGNORE_INDEX


def token_logprobs(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Log-probability of each scored next token.

    Shape: logits (B, T, V), any float dtype; labels (B, T), IGNORE_INDEX where not scored.
    Returns (logp, mask), both (B, T): logp[b, t] = log p(labels[b, t+1] | tokens <= t) in fp32, 0
    where not scored, and mask the scored positions (the last position never scores).
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"expected logits (B, T, V) and labels (B, T); got {tuple(logits.shape)} "
                         f"and {tuple(labels.shape)}")
    B, T, V = logits.shape
    target, mask = shift_labels(labels)
    chunk_rows = max(1, 2**26 // V)  # at most 64M fp32 values (256 MiB) upcast at a time
    logp = _LabelLogProb.apply(logits.reshape(B * T, V), target.masked_fill(~mask, 0).reshape(-1),
                               chunk_rows).view(B, T)
    return logp.masked_fill(~mask, 0.0), mask


class SeqStats(NamedTuple):
    """Per-sample statistics of the scored (answer) tokens y of each sequence. All (B,), fp32."""
    logp_sum: Tensor   # sum_i log p(y_i | x, y_<i)            (sequence log-likelihood)
    logp_mean: Tensor  # logp_sum / |y|                       (minus the mean token NLL)
    prob_mean: Tensor  # (1/|y|) sum_i p(y_i | x, y_<i)       (FLAT's P, arithmetic mean of probabilities)
    n_tokens: Tensor   # |y|


def sequence_stats(logits: Tensor, labels: Tensor) -> SeqStats:
    """Per-sample answer-token statistics; means divide by each sample's number of scored tokens.

    Shape: logits (B, T, V); labels (B, T) with IGNORE_INDEX on question and padding tokens.
    """
    logp, mask = token_logprobs(logits, labels)
    n = mask.sum(1)
    if bool((n == 0).any()):
        bad = (n == 0).nonzero().flatten().tolist()
        raise ValueError(f"samples {bad} have no scored tokens (every label is {IGNORE_INDEX})")
    n_f = n.float()
    logp_sum = logp.sum(1)
    prob_mean = (logp.exp() * mask).sum(1) / n_f
    return SeqStats(logp_sum, logp_sum / n_f, prob_mean, n)


def kl_to_reference(logits: Tensor, ref_logits: Tensor, labels: Tensor) -> Tensor:
    """Mean over scored tokens of KL(p_ref || p_theta), the forward KL from the frozen model.

    Shape: logits, ref_logits (B, T, V); labels (B, T). Returns (B,).
    KL(p_ref || p) = sum_v p_ref(v) (log p_ref(v) - log p(v)) at each scored position; only
    scored positions are gathered, so question and padding tokens never enter the sum.
    """
    if ref_logits.shape != logits.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and ref_logits {tuple(ref_logits.shape)} differ")
    _, mask = shift_labels(labels)
    B, T, V = logits.shape
    rows = mask.reshape(-1).nonzero().squeeze(1)                          # (N,)
    logq = logits.reshape(B * T, V).index_select(0, rows).float().log_softmax(-1)
    logp = ref_logits.reshape(B * T, V).index_select(0, rows).float().log_softmax(-1)
    kl_tok = (logp.exp() * (logp - logq)).sum(-1)                        # (N,)
    kl_sum = torch.zeros(B, dtype=kl_tok.dtype, device=kl_tok.device).index_add_(0, rows // T, kl_tok)
    return kl_sum / mask.sum(1).clamp(min=1)


def _check(**tensors: Tensor | None) -> None:
    """Fail at loss entry unless every given tensor is a 1-D float tensor of one shape (B,)."""
    shapes = {k: tuple(v.shape) for k, v in tensors.items() if v is not None}
    if any(len(s) != 1 for s in shapes.values()) or len(set(shapes.values())) != 1:
        raise ValueError(f"expected tensors of one shape (B,); got {shapes}")


# ---------------------------------------------------------------------------------------------
# FLAT (Wang et al., ICLR 2025, Sec. 4): the f-divergence variational bound between the template
# answer y_e and the forget answer y_f to the same forget question.
# ---------------------------------------------------------------------------------------------

class Divergence(NamedTuple):
    """One row of FLAT's Table 2: the divergence's generator f(u) (as text, for the reader), the
    optimal variational function g* (FLAT's activation on P) and the conjugate f* of f, the f-GAN
    pairs of Nowozin et al. 2016 (Table 6)."""
    generator: str
    g: Callable[[Tensor], Tensor]
    f_star: Callable[[Tensor], Tensor]


# Where this differs from the official FLAT code (UCSC-REAL/FLAT, dataloader.py): there, Reverse-KL
# uses g*(v) = -e^{v} (f-GAN: -e^{-v}) with conjugate 1 + v, and Squared-Hellinger and Neyman use
# g*(v) = 1 - e^{v} (f-GAN: 1 - e^{-v}), with Neyman's f* applied to v rather than to g*(v). With
# those signs, minimising the loss lowers P_e (and for Reverse-KL and Hellinger raises P_f): the
# model would unlearn the template and re-learn the forget answer. The f-GAN forms below make every
# g* increasing and every f* increasing on g*'s range, so the loss falls when P_e rises and when
# P_f falls for every divergence; tests/test_flat.py checks this on a grid and checks each f*
# against a numerical sup_u (t u - f(u)) of its generator f.
DIVERGENCES = {
    #                      generator f(u)                    g*(v)                         f*(t)
    # -- the four rows of the paper's Table 2
    "kl": Divergence("u log u", lambda v: v, lambda t: torch.exp(t - 1)),
    "pearson": Divergence("(u - 1)^2", lambda v: v, lambda t: t * t / 4 + t),
    "js": Divergence("-(u + 1) log((1 + u) / 2) + u log u",
                     lambda v: torch.log(torch.tensor(2.0, dtype=v.dtype, device=v.device)) - F.softplus(-v),
                     lambda t: -torch.log(2 - torch.exp(t))),
    "tv": Divergence("|u - 1| / 2", lambda v: 0.5 * torch.tanh(v), lambda t: t),
    # -- beyond the paper's table: the four further divergences of the official code, with f-GAN signs
    "reverse_kl": Divergence("-log u", lambda v: -torch.exp(-v), lambda t: -1 - torch.log(-t)),
    "neyman": Divergence("(1 - u)^2 / u", lambda v: 1 - torch.exp(-v), lambda t: 2 - 2 * torch.sqrt(1 - t)),
    "squared_hellinger": Divergence("(sqrt(u) - 1)^2", lambda v: 1 - torch.exp(-v), lambda t: t / (1 - t)),
    "jeffrey": Divergence("(u - 1) log u", lambda v: v, lambda t: _jeffrey_conjugate(t)),
}


def flat_loss(*, p_forget: Tensor, p_template: Tensor, divergence: str = "kl") -> Tensor:
    """FLAT loss (Wang et al., ICLR 2025, Sec. 4 and Table 2): minus the variational lower bound of
    the f-divergence D_f(D_e || D_f) between template and forget answers to the same forget question,

        L = -( g*(P_e) - f*(g*(P_f)) ),          FLAT-KL:  L = -( P_e - exp(P_f - 1) ),

    the bound sup_T E_{D_e}[T] - E_{D_f}[f*(T)] of f-GAN (Nowozin et al. 2016) with the critic T
    replaced by g*(mean token probability). P is the arithmetic mean of the answer's per-token
    probabilities (not log-probabilities; SeqStats.prob_mean). The pairs (g*, f*) are DIVERGENCES:
    kl, pearson, js and tv are the rows of Table 2; reverse_kl, neyman, squared_hellinger and
    jeffrey come from the official code, with the f-GAN signs.

    Its gradient is -lambda_e dP_e + lambda_f dP_f with lambda_e = g*'(P_e) and
    lambda_f = f*'(g*(P_f)) g*'(P_f): learning y_e and forgetting y_f, weighted by the divergence
    (the paper's "loss adjustment"; for KL, lambda_e = 1 and lambda_f = exp(P_f - 1)).

    Both tensors are keyword-only: they have the same shape, and swapping them trains the model to
    learn the forget answer and forget the template, with no error anywhere.

    Shape: p_forget (B,) = P_f, mean token probability of the forget answer y_f.
    Shape: p_template (B,) = P_e, mean token probability of the template answer y_e.
    divergence: a key of DIVERGENCES. Returns the per-sample loss (B,).
    """
    _check(p_forget=p_forget, p_template=p_template)
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; valid: {', '.join(DIVERGENCES)}")
    div = DIVERGENCES[divergence]
    return -(div.g(p_template) - div.f_star(div.g(p_forget)))


# ---------------------------------------------------------------------------------------------
# Baselines. "logp" arguments are SeqStats.logp_mean (minus the mean token NLL of the answer)
# unless named *_logp_sum (sequence log-likelihood), as each paper defines its loss.
# ---------------------------------------------------------------------------------------------

def ga_loss(forget_logp: Tensor) -> Tensor:
    """Gradient ascent on the forget answers (Jang et al. 2023; Yao et al. 2024, Eq. 3):
    minimise log p(y_f | x_f), i.e. maximise its NLL.

    Shape: forget_logp (B,). Returns (B,).
    """
    _check(forget_logp=forget_logp)
    return forget_logp


def gd_loss(forget_logp: Tensor, retain_logp: Tensor, retain_weight: float = 1.0) -> Tensor:
    """Gradient difference (Liu et al. 2022; TOFU, Maini et al. 2024, Sec. 5): GA on the forget
    answer plus the NLL of a retain answer, L = log p(y_f|x_f) - w log p(y_r|x_r).

    Shape: forget_logp (B,); retain_logp (B,), one retain example paired with each forget example.
    """
    _check(forget_logp=forget_logp, retain_logp=retain_logp)
    return forget_logp - retain_weight * retain_logp


def kl_loss(forget_logp: Tensor, retain_kl: Tensor, retain_weight: float = 1.0) -> Tensor:
    """GA plus KL to the reference model on retain answers (TOFU, Maini et al. 2024, Sec. 5):
    L = log p(y_f|x_f) + w KL(p_ref || p_theta) on the retain answer tokens.

    Shape: forget_logp (B,); retain_kl (B,) from kl_to_reference on the paired retain examples.
    """
    _check(forget_logp=forget_logp, retain_kl=retain_kl)
    return forget_logp + retain_weight * retain_kl


def idk_loss(template_logp: Tensor, retain_logp: Tensor, retain_weight: float = 1.0) -> Tensor:
    """Preference optimisation towards "I don't know" (TOFU, Maini et al. 2024, Sec. 5): NLL of
    the template answer y_e to the forget question plus the retain NLL.

    Shape: template_logp (B,); retain_logp (B,).
    """
    _check(template_logp=template_logp, retain_logp=retain_logp)
    return -template_logp - retain_weight * retain_logp


def dpo_loss(template_logp_sum: Tensor, forget_logp_sum: Tensor, ref_template_logp_sum: Tensor,
             ref_forget_logp_sum: Tensor, beta: float = 0.1) -> Tensor:
    """DPO (Rafailov et al. 2023, Eq. 7) with the template answer as chosen and the forget answer
    as rejected, scaled by 2/beta as TOFU, the official FLAT code and open-unlearning scale it:

        L = -(2/beta) log sigma(beta [log pi(y_e)/pi_ref(y_e) - log pi(y_f)/pi_ref(y_f)]).

    Rafailov et al. write it without the factor 2/beta; the minimiser is the same, but the gradient
    is 2/beta times larger (20x at beta = 0.1), which changes how gradient clipping and a given
    learning rate act. The published unlearning runs use the scaled form, so this does too; NPO
    (npo_loss) has the same 2/beta.

    Shape: each argument (B,), sequence log-likelihoods (SeqStats.logp_sum) under the model and
    under the frozen reference. Unlike the official FLAT code, the reference term is not zeroed.
    """
    _check(template_logp_sum=template_logp_sum, forget_logp_sum=forget_logp_sum,
           ref_template_logp_sum=ref_template_logp_sum, ref_forget_logp_sum=ref_forget_logp_sum)
    margin = (template_logp_sum - ref_template_logp_sum) - (forget_logp_sum - ref_forget_logp_sum)
    return -(2 / beta) * F.logsigmoid(beta * margin)


def npo_loss(forget_logp_sum: Tensor, ref_forget_logp_sum: Tensor, beta: float = 0.1,
             retain_logp: Tensor | None = None, retain_weight: float = 1.0) -> Tensor:
    """Negative preference optimisation (Zhang et al. 2024, Eq. 3):
    L = -(2/beta) log sigma(-beta log pi(y_f)/pi_ref(y_f)), plus w times the retain NLL when
    retain_logp is given (NPO+RT). As beta -> 0 its gradient tends to that of GA on logp_sum.

    Shape: forget_logp_sum, ref_forget_logp_sum (B,); retain_logp (B,) or None.
    """
    _check(forget_logp_sum=forget_logp_sum, ref_forget_logp_sum=ref_forget_logp_sum, retain_logp=retain_logp)
    loss = -(2 / beta) * F.logsigmoid(-beta * (forget_logp_sum - ref_forget_logp_sum))
    return loss if retain_logp is None else loss - retain_weight * retain_logp


def simnpo_loss(forget_logp: Tensor, beta: float = 2.5, delta: float = 0.0,
                retain_logp: Tensor | None = None, retain_weight: float = 1.0) -> Tensor:
    """SimNPO (Fan et al. 2024, Eq. 4), reference-free and length-normalised:
    L = -(2/beta) log sigma(-(beta/|y|) log pi(y_f|x_f) - delta), plus w times the retain NLL when
    retain_logp is given. delta is the paper's reward margin gamma (open-unlearning scales its
    delta by beta: its delta d equals delta = beta * d here).

    Shape: forget_logp (B,) = logp_mean; retain_logp (B,) or None.
    """
    _check(forget_logp=forget_logp, retain_logp=retain_logp)
    loss = -(2 / beta) * F.logsigmoid(-beta * forget_logp - delta)
    return loss if retain_logp is None else loss - retain_weight * retain_logp


def llmu_loss(forget_logp: Tensor, random_logp: Tensor, normal_kl: Tensor,
              eps1: float = 0.5, eps2: float = 1.0, eps3: float = 1.0) -> Tensor:
    """Yao, Xu, Liu (NeurIPS 2024), Eq. 2-6: eps1 L_fgt + eps2 L_rdn + eps3 L_nor with
    L_fgt = log p(y_harm|x_harm) (gradient ascent), L_rdn = -log p(y_rdn|x_harm) (the harmful prompt
    answered with a random normal answer), L_nor = KL(p_original || p_theta) on normal answers.

    All three use answer tokens only (the official code also scores the question in L_rdn and
    every position, padding included, in L_nor) and per-token means, as the official code does
    (the paper writes sums; the eps values were tuned with means).
    Shape: forget_logp, random_logp, normal_kl (B,), one random and one normal example per harmful one.
    """
    _check(forget_logp=forget_logp, random_logp=random_logp, normal_kl=normal_kl)
    return eps1 * forget_logp - eps2 * random_logp + eps3 * normal_kl


# ---------------------------------------------------------------------------------------------
# Numerical machinery: a memory-lean gather of label log-probabilities, and Lambert W for the
# Jeffrey conjugate. Correct to round-off (tests/test_flat.py); nothing a reader of the paper needs.
# ---------------------------------------------------------------------------------------------

class _LabelLogProb(torch.autograd.Function):
    """log softmax(logits)[label] for each row of a (N, V) matrix, in fp32, chunked over rows.

    The naive version, `torch.log_softmax(logits.float(), -1).gather(-1, labels[:, None])`, keeps a
    second (N, V) tensor (in fp32: twice the size of bf16 logits) alive until backward. Here forward
    saves only the logits, which the model's graph holds anyway, and the log-normaliser (N,);
    backward recomputes softmax one chunk at a time: d logp_label / d logits = onehot(label) - softmax.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, chunk_rows: int) -> Tensor:
        acc = torch.promote_types(logits.dtype, torch.float32)  # fp32, or fp64 when given fp64
        n = logits.shape[0]
        lse = torch.empty(n, dtype=acc, device=logits.device)
        for s in range(0, n, chunk_rows):
            lse[s:s + chunk_rows] = torch.logsumexp(logits[s:s + chunk_rows].to(acc), dim=-1)
        picked = logits.gather(1, labels[:, None]).squeeze(1).to(acc)
        ctx.save_for_backward(logits, labels, lse)
        ctx.chunk_rows = chunk_rows
        return picked - lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        logits, labels, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for s in range(0, logits.shape[0], ctx.chunk_rows):
            e = s + ctx.chunk_rows
            g = grad_out[s:e, None]                                    # (c, 1)
            chunk = torch.exp(logits[s:e].to(lse.dtype) - lse[s:e, None]).mul_(-g)  # -softmax * g
            chunk.scatter_add_(1, labels[s:e, None], g)                # + onehot(label) * g
            grad[s:e] = chunk
        return grad, None, None


class _LambertW(torch.autograd.Function):
    """Principal branch W(z), z >= 0, solving w * exp(w) = z by Halley's method.

    Six iterations from log1p(z) reach float64 round-off on z in [0, 1e6]; dW/dz = W / (z (1 + W)).
    """

    @staticmethod
    def forward(ctx, z: Tensor) -> Tensor:
        zd = z.double()
        w = torch.log1p(zd)
        for _ in range(6):
            ew = torch.exp(w)
            f = w * ew - zd
            w = w - f / (ew * (w + 1) - (w + 2) * f / (2 * w + 2))
        w = w.to(z.dtype)
        ctx.save_for_backward(z, w)
        return w

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        z, w = ctx.saved_tensors
        return grad * w / (z * (1 + w))


def lambertw(z: Tensor) -> Tensor:
    """Principal branch of the Lambert W function for z >= 0 (differentiable for z > 0)."""
    return _LambertW.apply(z)


def _jeffrey_conjugate(t: Tensor) -> Tensor:
    # f(u) = (u - 1) log u  =>  f*(t) = W(e^{1-t}) + 1/W(e^{1-t}) + t - 2, exact (no Taylor series).
    w = lambertw(torch.exp(1 - t))
    return w + 1 / w + t - 2
