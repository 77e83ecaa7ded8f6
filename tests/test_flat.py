"""flat.py against slow, obviously-correct references on random tensors with padding."""
import dataclasses
import math

import numpy as np
import pytest
import scipy.optimize
import scipy.special
import torch

import flat
import methods

B, T, V = 5, 14, 23


def make_batch(seed=0, dtype=torch.float32):
    """Random logits and labels: question tokens, then an answer of varying length, then padding."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g).to(dtype)
    labels = torch.full((B, T), flat.IGNORE_INDEX)
    for b in range(B):
        q = 2 + b % 3                          # question length
        a = [1, 3, 6, 9, 11][b]                # answer length, one token to almost all of the sequence
        a = min(a, T - q)
        labels[b, q:q + a] = torch.randint(0, V, (a,), generator=g)
    return logits, labels


def slow_token_logps(logits, labels):
    """Per sample: the list of log p(label_{t+1} | <= t) over scored positions, one position at a time."""
    out = []
    for b in range(logits.shape[0]):
        lps = []
        for t in range(logits.shape[1] - 1):
            y = int(labels[b, t + 1])
            if y != flat.IGNORE_INDEX:
                lps.append(torch.log_softmax(logits[b, t].double(), -1)[y])
        out.append(torch.stack(lps))
    return out


def slow_stats(logits, labels):
    per = slow_token_logps(logits, labels)
    return {"logp_sum": torch.stack([lp.sum() for lp in per]),
            "logp_mean": torch.stack([lp.mean() for lp in per]),
            "prob_mean": torch.stack([lp.exp().mean() for lp in per])}


def slow_kl(logits, ref_logits, labels):
    """Mean over scored positions of sum_v p_ref(v) log(p_ref(v) / p(v)), by loops over v."""
    out = []
    for b in range(logits.shape[0]):
        kls = []
        for t in range(logits.shape[1] - 1):
            if int(labels[b, t + 1]) == flat.IGNORE_INDEX:
                continue
            p = torch.softmax(ref_logits[b, t].double(), -1)
            q = torch.softmax(logits[b, t].double(), -1)
            kls.append(sum(p[v] * math.log(p[v] / q[v]) for v in range(logits.shape[2])))
        out.append(sum(kls) / len(kls))
    return torch.stack(out)


# ---------------------------------------------------------------- the log-prob helper

def test_sequence_stats_matches_slow_loop_values_and_gradients():
    logits, labels = make_batch()
    logits.requires_grad_(True)
    fast = flat.sequence_stats(logits, labels)
    ref_logits = logits.detach().double().requires_grad_(True)
    slow = slow_stats(ref_logits, labels)
    for k in slow:
        torch.testing.assert_close(getattr(fast, k).double(), slow[k], atol=1e-5, rtol=1e-5)
    assert fast.n_tokens.tolist() == [len(x) for x in slow_token_logps(logits.detach(), labels)]

    w = torch.randn(3, B, dtype=torch.float64)
    (w[0] * fast.logp_sum + w[1] * fast.logp_mean + w[2] * fast.prob_mean).sum().backward()
    (w[0] * slow["logp_sum"] + w[1] * slow["logp_mean"] + w[2] * slow["prob_mean"]).sum().backward()
    torch.testing.assert_close(logits.grad.double(), ref_logits.grad, atol=1e-6, rtol=1e-5)


def test_unscored_positions_get_no_gradient():
    logits, labels = make_batch(1)
    logits.requires_grad_(True)
    s = flat.sequence_stats(logits, labels)
    (s.logp_sum + s.prob_mean).sum().backward()
    _, mask = flat.shift_labels(labels)
    assert torch.all(logits.grad[~mask] == 0)
    assert torch.all(logits.grad[mask].abs().sum(-1) > 0)


def test_chunked_label_logprob_equals_one_chunk_and_passes_gradcheck():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(9, 7, dtype=torch.float64, generator=g, requires_grad=True)
    y = torch.randint(0, 7, (9,), generator=g)
    one = flat._LabelLogProb.apply(x, y, 1000)
    chunked = flat._LabelLogProb.apply(x, y, 2)
    torch.testing.assert_close(one, chunked)
    torch.testing.assert_close(one, torch.log_softmax(x, -1).gather(1, y[:, None]).squeeze(1))
    assert torch.autograd.gradcheck(lambda x: flat._LabelLogProb.apply(x, y, 4), (x,))


def test_bf16_logits_are_scored_in_fp32():
    logits, labels = make_batch(3, torch.bfloat16)
    fast = flat.sequence_stats(logits, labels)
    assert fast.logp_mean.dtype == torch.float32
    slow = slow_stats(logits.double(), labels)  # same bf16 values, upcast by hand
    torch.testing.assert_close(fast.logp_mean.double(), slow["logp_mean"], atol=1e-5, rtol=1e-5)


def test_kl_to_reference_matches_definition_and_ignores_unscored_positions():
    logits, labels = make_batch(4)
    ref_logits, _ = make_batch(5)
    fast = flat.kl_to_reference(logits, ref_logits, labels)
    torch.testing.assert_close(fast.double(), slow_kl(logits, ref_logits, labels), atol=1e-5, rtol=1e-5)
    # KL is zero where the reference agrees on every scored position, whatever it says elsewhere.
    _, mask = flat.shift_labels(labels)
    other = torch.where(mask[..., None], logits, ref_logits)
    torch.testing.assert_close(flat.kl_to_reference(logits, other, labels), torch.zeros(B), atol=1e-6, rtol=0)


# ---------------------------------------------------------------- FLAT divergences

# Generators f(u) of each f-divergence (Nowozin et al. 2016, Table 1), written independently of flat.py.
GENERATORS = {
    "kl": lambda u: u * math.log(u),
    "reverse_kl": lambda u: -math.log(u),
    "pearson": lambda u: (u - 1) ** 2,
    "neyman": lambda u: (1 - u) ** 2 / u,
    "squared_hellinger": lambda u: (math.sqrt(u) - 1) ** 2,
    "jeffrey": lambda u: (u - 1) * math.log(u),
    "js": lambda u: -(u + 1) * math.log((1 + u) / 2) + u * math.log(u),
    "tv": lambda u: 0.5 * abs(u - 1),
}
GRID = [0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0]


def test_every_divergence_is_listed():
    assert sorted(flat.DIVERGENCES) == sorted(GENERATORS)


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_conjugate_equals_numerical_sup_of_generator(name):
    """f*(t) = sup_u (t u - f(u)) at t = g*(v), the points where FLAT evaluates it."""
    div = flat.DIVERGENCES[name]
    for v in [0.01, 0.2, 0.5, 0.9, 1.0]:
        t = float(div.g(torch.tensor(v, dtype=torch.float64)))
        res = scipy.optimize.minimize_scalar(lambda s: -(t * math.exp(s) - GENERATORS[name](math.exp(s))),
                                             bounds=(-30, 12), method="bounded", options={"xatol": 1e-12})
        fstar = float(div.f_star(torch.tensor(t, dtype=torch.float64)))
        assert abs(-res.fun - fstar) < 1e-6, (name, v, -res.fun, fstar)


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_loss_falls_when_template_prob_rises_and_forget_prob_falls(name):
    pe, pf = torch.meshgrid(torch.tensor(GRID, dtype=torch.float64), torch.tensor(GRID, dtype=torch.float64),
                            indexing="ij")
    pe, pf = pe.flatten().requires_grad_(True), pf.flatten().requires_grad_(True)
    flat.flat_loss(p_forget=pf, p_template=pe, divergence=name).sum().backward()
    assert torch.all(pe.grad < 0), (name, pe.grad.max())
    assert torch.all(pf.grad > 0), (name, pf.grad.min())


def test_kl_divergence_gives_the_published_form_and_weights():
    # FLAT-KL as restated in DRAGON App. C.1: L = -(P_e - exp(P_f - 1)); lambda_e = 1, lambda_f = e^{P_f - 1}.
    pe = torch.tensor([0.2, 0.7], requires_grad=True)
    pf = torch.tensor([0.9, 0.1], requires_grad=True)
    loss = flat.flat_loss(p_forget=pf, p_template=pe, divergence="kl")
    torch.testing.assert_close(loss, -(pe - torch.exp(pf - 1)))
    loss.sum().backward()
    torch.testing.assert_close(pe.grad, -torch.ones(2))
    torch.testing.assert_close(pf.grad, torch.exp(pf.detach() - 1))


def test_tv_weights_tend_to_one_half_at_small_probabilities():
    p = torch.full((1,), 1e-4, requires_grad=True)
    q = torch.full((1,), 1e-4, requires_grad=True)
    flat.flat_loss(p_forget=p, p_template=q, divergence="tv").backward()
    assert abs(float(p.grad) - 0.5) < 1e-6 and abs(float(q.grad) + 0.5) < 1e-6


def test_lambertw_matches_scipy():
    z = torch.tensor([0.0, 1e-6, 0.3, 1.0, 2.0, math.e, 10.0, 1e3, 1e6], dtype=torch.float64)
    ours = flat.lambertw(z)
    assert torch.allclose(ours, torch.tensor(scipy.special.lambertw(z.numpy()).real), rtol=1e-12, atol=1e-14)
    assert torch.autograd.gradcheck(flat.lambertw, (torch.tensor([0.5, 1.7, 9.0], dtype=torch.float64,
                                                                 requires_grad=True),))


# ---------------------------------------------------------------- every loss against a slow formula

def sigmoid(x):
    return 1 / (1 + math.exp(-x))


SLOW_G = {  # g*(v), f*(t) as scalar Python, for the loss-level check
    "kl": (lambda v: v, lambda t: math.exp(t - 1)),
    "reverse_kl": (lambda v: -math.exp(-v), lambda t: -1 - math.log(-t)),
    "pearson": (lambda v: v, lambda t: t * t / 4 + t),
    "neyman": (lambda v: 1 - math.exp(-v), lambda t: 2 - 2 * math.sqrt(1 - t)),
    "squared_hellinger": (lambda v: 1 - math.exp(-v), lambda t: t / (1 - t)),
    "jeffrey": (lambda v: v, lambda t: (lambda w: w + 1 / w + t - 2)(scipy.special.lambertw(math.exp(1 - t)).real)),
    "js": (lambda v: math.log(2) - math.log(1 + math.exp(-v)), lambda t: -math.log(2 - math.exp(t))),
    "tv": (lambda v: 0.5 * math.tanh(v), lambda t: t),
}


def slow_loss(name, b, s, p):
    """One sample's loss from the slow per-sample statistics s[stream][key][b], as each paper writes it."""
    f, t, r = s["forget"], s.get("template"), s.get("retain")
    rf, rt = s.get("ref_forget"), s.get("ref_template")
    lf = float(f["logp_mean"][b])
    if name == "flat":
        g, fs = SLOW_G[p.divergence]
        return -(g(float(t["prob_mean"][b])) - fs(g(float(f["prob_mean"][b]))))
    if name == "ga":
        return lf
    if name == "gd":
        return lf - p.retain_weight * float(r["logp_mean"][b])
    if name == "kl":
        return lf + p.retain_weight * float(s["retain_kl"][b])
    if name == "idk":
        return -float(t["logp_mean"][b]) - p.retain_weight * float(r["logp_mean"][b])
    if name == "dpo":
        m = (float(t["logp_sum"][b]) - float(rt["logp_sum"][b])) - (float(f["logp_sum"][b]) - float(rf["logp_sum"][b]))
        return -(2 / p.beta) * math.log(sigmoid(p.beta * m))
    if name == "npo":
        x = -(2 / p.beta) * math.log(sigmoid(-p.beta * (float(f["logp_sum"][b]) - float(rf["logp_sum"][b]))))
        return x - p.retain_weight * float(r["logp_mean"][b]) if p.npo_retain else x
    if name == "simnpo":
        x = -(2 / p.simnpo_beta) * math.log(sigmoid(-p.simnpo_beta * lf - p.simnpo_delta))
        return x - p.retain_weight * float(r["logp_mean"][b]) if p.npo_retain else x
    if name == "llmu":
        return p.eps1 * lf - p.eps2 * float(t["logp_mean"][b]) + p.eps3 * float(s["retain_kl"][b])
    raise AssertionError(name)


def all_stats(fast: bool):
    """Statistics of every stream, from flat.py (fast) or from the slow loops."""
    batches = {k: make_batch(seed) for seed, k in enumerate(["forget", "template", "retain"], start=10)}
    refs = {k: make_batch(seed)[0] for seed, k in enumerate(["forget", "template", "retain"], start=20)}
    stats = {}
    for k, (logits, labels) in batches.items():
        stats[k] = flat.sequence_stats(logits, labels) if fast else slow_stats(logits, labels)
        if k != "retain":
            stats["ref_" + k] = (flat.sequence_stats(refs[k], labels) if fast else slow_stats(refs[k], labels))
    logits, labels = batches["retain"]
    stats["retain_kl"] = (flat.kl_to_reference(logits, refs["retain"], labels) if fast
                          else slow_kl(logits, refs["retain"], labels))
    return stats


PARAMS = [methods.LossParams(divergence=d) for d in sorted(GENERATORS)] + [
    methods.LossParams(retain_weight=0.3, beta=0.5, simnpo_beta=3.0, simnpo_delta=0.7, npo_retain=True,
                    eps1=2.0, eps2=0.5, eps3=0.25)]


@pytest.mark.parametrize("params", PARAMS, ids=lambda p: f"{p.divergence}-rt{p.npo_retain}")
def test_every_loss_matches_its_slow_formula(params):
    fast, slow = all_stats(True), all_stats(False)
    for name, method in methods.LOSSES.items():
        out = method.call(fast, params)
        assert out.shape == (B,), name
        want = torch.tensor([slow_loss(name, b, slow, params) for b in range(B)], dtype=torch.float64)
        torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")


def test_npo_gradient_tends_to_gradient_ascent_as_beta_vanishes():
    logits, labels = make_batch(6)
    ref_logits, _ = make_batch(7)
    ref = flat.sequence_stats(ref_logits, labels).logp_sum

    def grad(fn):
        x = logits.clone().requires_grad_(True)
        fn(flat.sequence_stats(x, labels)).sum().backward()
        return x.grad

    ga = grad(lambda s: flat.ga_loss(s.logp_sum))  # GA on the sequence log-likelihood
    for beta, tol in [(1e-2, 5e-2), (1e-4, 5e-4)]:
        npo = grad(lambda s: flat.npo_loss(s.logp_sum, ref, beta))
        rel = float((npo - ga).norm() / ga.norm())
        assert rel < tol, (beta, rel)
    # and with a large beta, samples already less likely than under the reference stop being pushed
    stats = flat.sequence_stats(logits.clone().requires_grad_(True), labels)
    w = torch.autograd.grad(flat.npo_loss(stats.logp_sum, stats.logp_sum.detach() + 50, 1.0).sum(),
                            stats.logp_sum)[0]
    assert torch.all(w < 1e-6)


def test_simnpo_gradient_tends_to_mean_gradient_ascent_as_beta_vanishes():
    lp = torch.tensor([-3.0, -0.2, -8.0], requires_grad=True)
    (g,) = torch.autograd.grad(flat.simnpo_loss(lp, beta=1e-5).sum(), lp)
    torch.testing.assert_close(g, torch.ones(3), atol=1e-4, rtol=0)


def test_dpo_has_the_anchors_2_over_beta_scale_and_prefers_the_template():
    # TOFU, the official FLAT code and open-unlearning: -(2/beta) log sigma(beta * margin); at zero
    # margin that is (2/beta) log 2, 20 log 2 at beta = 0.1 (Rafailov et al.'s unscaled form gives log 2).
    z = torch.zeros(4)
    torch.testing.assert_close(flat.dpo_loss(z, z, z, z), torch.full((4,), 20 * math.log(2)))
    torch.testing.assert_close(flat.dpo_loss(z, z, z, z, beta=0.5), torch.full((4,), 4 * math.log(2)))
    t = torch.zeros(4, requires_grad=True)
    f = torch.zeros(4, requires_grad=True)
    flat.dpo_loss(t, f, z, z).sum().backward()
    assert torch.all(t.grad < 0) and torch.all(f.grad > 0)
    torch.testing.assert_close(t.grad, torch.full((4,), -1.0))  # d/dm of -(2/b) log sigma(b m) at 0 = -1


def test_flat_loss_refuses_positional_tensors():
    """Two tensors of one shape: a swapped positional call would train the opposite of FLAT."""
    p = torch.full((2,), 0.5)
    with pytest.raises(TypeError, match="positional"):
        flat.flat_loss(p, p)


class _Recorder:
    """A LossParams stand-in that records which fields are read."""
    def __init__(self, params):
        self.params, self.read = params, set()

    def __getattr__(self, name):
        if name in ("params", "read"):
            raise AttributeError(name)
        self.read.add(name)
        return getattr(self.params, name)


def test_each_method_declares_exactly_the_hyperparameters_it_reads():
    """What a method declares in `params` is what its stage key holds: a field it reads but does not
    declare would let a changed flag reuse a stale stage; one it declares but never reads would split
    the cache for nothing."""
    stats = all_stats(True)
    for name, method in methods.LOSSES.items():
        read = set()
        for npo_retain in (False, True):
            rec = _Recorder(methods.LossParams(npo_retain=npo_retain))
            method.call(stats, rec)
            assert rec.read <= set(method.params), (name, rec.read - set(method.params))
            read |= rec.read
        assert read == set(method.params), (name, set(method.params) - read)


# ---------------------------------------------------------------- bad input

def test_unknown_names_list_the_valid_ones():
    with pytest.raises(KeyError, match="unknown loss 'nope'.*dpo, flat, ga"):
        methods.LOSSES["nope"]
    with pytest.raises(ValueError, match="unknown divergence 'kll'.*jeffrey"):  # flat.py alone says it too
        flat.flat_loss(p_forget=torch.ones(2) / 2, p_template=torch.ones(2) / 2, divergence="kll")
    with pytest.raises(KeyError, match="unknown divergence 'kll'; valid names: .*jeffrey"):
        methods.DIVERGENCES.check("kll")


def test_shape_mismatches_fail_at_entry():
    with pytest.raises(ValueError, match="one shape"):
        flat.flat_loss(p_forget=torch.rand(3), p_template=torch.rand(4))
    with pytest.raises(ValueError, match="one shape"):
        flat.ga_loss(torch.rand(3, 2))
    with pytest.raises(ValueError, match="one shape"):
        flat.llmu_loss(torch.rand(2), torch.rand(2), torch.rand(3))
    logits, labels = make_batch()
    with pytest.raises(ValueError, match="expected logits"):
        flat.sequence_stats(logits, labels[:, :-1])
    with pytest.raises(ValueError, match="differ"):
        flat.kl_to_reference(logits, logits[:, :-1], labels)


def test_a_sample_without_answer_tokens_is_an_error_not_a_nan():
    logits, labels = make_batch()
    labels[2] = flat.IGNORE_INDEX
    with pytest.raises(ValueError, match=r"samples \[2\] have no scored tokens"):
        flat.sequence_stats(logits, labels)


def test_losses_are_finite_at_probability_one_and_near_zero():
    for name in GENERATORS:
        for p in [1.0, 1e-7]:
            x = torch.full((2,), p, dtype=torch.float32)
            assert torch.isfinite(flat.flat_loss(p_forget=x, p_template=x, divergence=name)).all(), (name, p)
    assert np.isfinite(float(flat.npo_loss(torch.tensor([-500.0]), torch.tensor([0.0]))))


def _first_step(setting: str, value: float) -> list[tuple[torch.Tensor, list]]:
    """(loss, gradients) of each loss reading `setting` at `value`, on the inputs of a first unlearning
    step: the model equals its reference (log-ratios and KL terms exactly 0), answer log-probabilities -1."""
    p = dict(beta=0.1, simnpo_beta=2.5, simnpo_delta=0.0, retain_weight=1.0, eps1=0.5, eps2=1.0, eps3=1.0)
    p[setting] = value
    losses = {"beta": [lambda x, z: flat.npo_loss(x * 20, x.detach() * 20, p["beta"]),
                       lambda x, z: flat.dpo_loss(x * 20, x * 20, x.detach() * 20, x.detach() * 20, p["beta"])],
              "simnpo_beta": [lambda x, z: flat.simnpo_loss(x, p["simnpo_beta"], p["simnpo_delta"])],
              "retain_weight": [lambda x, z: flat.kl_loss(x, z, p["retain_weight"]),
                                lambda x, z: flat.gd_loss(x, x, p["retain_weight"]),
                                lambda x, z: flat.idk_loss(x, x, p["retain_weight"])],
              "eps1": [lambda x, z: flat.llmu_loss(x, x, z, p["eps1"], p["eps2"], p["eps3"])]}
    losses["simnpo_delta"], losses["eps2"], losses["eps3"] = losses["simnpo_beta"], losses["eps1"], losses["eps1"]
    out = []
    for loss_fn in losses[setting]:
        logp, zero = torch.full((3,), -1.0, requires_grad=True), torch.zeros(3, requires_grad=True)
        loss = loss_fn(logp, zero)
        loss.sum().backward()
        out.append((loss, [g for g in (logp.grad, zero.grad) if g is not None]))
    return out


def _finite(results) -> bool:
    return all(torch.isfinite(loss).all() and all(torch.isfinite(g).all() for g in grads) for loss, grads in results)


def test_loss_setting_ranges_are_where_the_first_step_is_finite():
    """methods' derived ranges: at each edge the first step's losses and gradients are finite in float32;
    just outside (an edge that the derivation says is tight) one of them is not, and the range refuses it."""
    f32 = torch.finfo(torch.float32).max
    edges = {"beta": (2 / f32, f32), "simnpo_beta": (2 / f32, f32), "simnpo_delta": (None, f32),
             "retain_weight": (None, f32), "eps1": (None, f32), "eps2": (None, f32), "eps3": (None, f32)}
    fields = {f.name: f for f in dataclasses.fields(methods.LossParams)}
    for setting, (low, high) in edges.items():
        check = fields[setting].metadata["check"]
        for inside, outside in [(low * 1.001, low * 0.999) if low else (None, None), (high, high * 1.001)]:
            if inside is None:
                continue
            assert check.ok(inside) and _finite(_first_step(setting, inside)), (setting, inside)
            assert not check.ok(outside) and not _finite(_first_step(setting, outside)), (setting, outside)
