"""VRPO: the contract's DPO-on-ELBO loss against hand-computed values and trl's DPO sigmoid loss;
antithetic sampling (shared masks) makes policy = reference score exactly 0; at equal budget the
variance-reduced preference score is far less noisy than the naive one."""
import copy
import math

import pytest
import torch

from rlgen.algos.vrpo import VRPOConfig, dpo_loss, preference_elbos, preference_score
from rlgen.registry import ALGORITHMS
from rlgen.samplers.likelihood import elbo_from_plan, make_mask_plan
from trl_dpo import trl_dpo_sigmoid

pytestmark = pytest.mark.usefixtures("one_thread")


def nls(x):
    return math.log1p(math.exp(-x))


def test_hand_computed():
    out, m = dpo_loss(torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -4.0]), torch.tensor([-3.5, -5.0]),
                      torch.tensor([-3.5, -3.0]), beta=0.5)
    # score = β·((B_θw − B_rw) − (B_θl − B_rl)) = 0.5·(0.5 − (−0.5)) = 0.5 and 0.5·(0 − (−1)) = 0.5
    assert out.item() == pytest.approx(nls(0.5), rel=1e-6)
    assert m["implicit_acc"] == 1.0 and m["reward_margin"] == pytest.approx(0.5)
    assert m["chosen_reward"] == pytest.approx(0.125) and m["rejected_reward"] == pytest.approx(-0.375)


def test_matches_trl_sigmoid_loss():
    g = torch.Generator().manual_seed(0)
    ew, el, rw, rl = (-10 * torch.rand(7, generator=g, dtype=torch.float64) for _ in range(4))
    ours, m = dpo_loss(ew, el, rw, rl, beta=0.2)
    theirs, tm = trl_dpo_sigmoid(ew, el, rw, rl, 0.2)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-9)
    assert m["implicit_acc"] == pytest.approx(tm["accuracy"])
    assert m["reward_margin"] == pytest.approx(tm["margin"], rel=1e-9)


def test_reference_gets_no_gradient():
    ew, el = torch.tensor([-1.0], requires_grad=True), torch.tensor([-2.0], requires_grad=True)
    rw, rl = torch.tensor([-1.0], requires_grad=True), torch.tensor([-2.0], requires_grad=True)
    dpo_loss(ew, el, rw, rl, 1.0)[0].backward()
    assert rw.grad is None and ew.grad.item() < 0 < el.grad.item()


# ----------------------------------------------------------------------------------------------
# ELBO estimates on a tiny masked LM
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models():
    from rlgen.data.tokenizer import build_tokenizer
    from rlgen.models.masked_lm import MaskedDiffusionLM

    torch.manual_seed(0)
    tok = build_tokenizer()
    ref = MaskedDiffusionLM.tiny(tok, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64).eval()
    policy = copy.deepcopy(ref)
    with torch.no_grad():  # a nearby policy, as after some DPO steps
        for p in policy.parameters():
            if p.numel() > 1:
                p.add_(0.1 * p.std() * torch.randn_like(p))
    return policy, ref


def batch(B=4, P=5, L=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(3, 20, (B, P), generator=g), torch.randint(3, 20, (B, L), generator=g),
            torch.randint(3, 20, (B, L), generator=g))


def test_antithetic_policy_equal_reference_scores_zero(models):
    _, ref = models
    p, w, l = batch()
    vr = VRPOConfig(n_samples=4)
    s = preference_score(ref, ref, p, w, l, ref.mask_id, vr, torch.Generator().manual_seed(0))
    assert torch.equal(s, torch.zeros_like(s))
    naive = VRPOConfig(n_samples=4, antithetic=False, allocation="naive")
    s = preference_score(ref, ref, p, w, l, ref.mask_id, naive, torch.Generator().manual_seed(0))
    assert s.abs().max() > 0  # independent draws: noise even when the models are the same


def test_elbos_use_one_plan_for_both_models(models):
    policy, ref = models
    p, w, l = batch()
    cfg = VRPOConfig(n_samples=3)
    e_w, e_l, r_w, r_l = preference_elbos(policy, ref, p, w, l, ref.mask_id, cfg, torch.Generator().manual_seed(5))
    plan = make_mask_plan(8, 4, 3, torch.Generator().manual_seed(5), form="l", allocation="optimal")
    prompts, answers = torch.cat([p, p]), torch.cat([w, l])
    want_pol = elbo_from_plan(policy, prompts, answers, plan, ref.mask_id)
    want_ref = elbo_from_plan(ref, prompts, answers, plan, ref.mask_id)
    assert torch.allclose(torch.cat([e_w, e_l]), want_pol, atol=1e-5)
    assert torch.allclose(torch.cat([r_w, r_l]), want_ref, atol=1e-5)
    assert e_w.requires_grad and not r_w.requires_grad


def test_variance_reduction_at_equal_budget(models):
    policy, ref = models
    p, w, l = batch(B=6)

    def var(cfg):
        draws = torch.stack([preference_score(policy, ref, p, w, l, ref.mask_id, cfg,
                                              torch.Generator().manual_seed(s)) for s in range(40)])  # (R, B)
        return draws.var(0).mean().item()

    naive = var(VRPOConfig(beta=1.0, n_samples=4, antithetic=False, allocation="naive"))
    vrpo = var(VRPOConfig(beta=1.0, n_samples=4))
    assert naive / vrpo > 4


def test_registered_and_config_checks():
    from rlgen.algos.vrpo import VRPO

    assert ALGORITHMS.get("vrpo") is VRPO and VRPO.family == "masked_lm"
    with pytest.raises(ValueError, match="allocation"):
        VRPOConfig(allocation="stratified")


def test_bench_elbo_variance_matches_direct_draws(models):
    """The bench's per-model ELBO variance (naive allocation) equals the variance of plain l-form
    ELBOs drawn with the same seeds, averaged over the chosen and rejected answers."""
    import importlib.util
    from pathlib import Path

    from rlgen.samplers.likelihood import elbo_l

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_vrpo_variance.py"
    spec = importlib.util.spec_from_file_location("bench_vrpo_variance", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    _, ref = models
    p, w, l = batch(B=3)
    data = bench.TextPairs(p.tolist(), w.tolist(), l.tolist(), ref.mask_id, ref.eos_id)
    got = bench.elbo_variance(ref, data, [0, 1, 2], n=4, allocation="naive", form="l", repeats=6, seed=2)
    with torch.no_grad():
        draws = torch.stack([elbo_l(ref, torch.cat([p, p]), torch.cat([w, l]), ref.mask_id, 4,
                                    torch.Generator().manual_seed(2 * 100_003 + r)) for r in range(6)])  # (R, 2B)
    assert got == pytest.approx(draws.double().var(0).mean().item(), rel=1e-5)


# ----------------------------------------------------------------------------------------------
# algo.sft_weight (RPO-style NLL on the chosen answer) and the per-step variance estimates
# ----------------------------------------------------------------------------------------------
def test_sft_term_hand_computed():
    from rlgen.algos.vrpo import vrpo_loss

    args = (torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -4.0]), torch.tensor([-3.5, -5.0]),
            torch.tensor([-3.5, -3.0]))
    out, m = vrpo_loss(*args, beta=0.5, sft_weight=2.0, answer_len=4)
    # DPO rows: −log σ(0.5) twice (test_hand_computed); NLL per token: 3/4 and 5/4, weighted by 2
    want = nls(0.5) + 2.0 * (3.0 / 4 + 5.0 / 4) / 2
    assert out.item() == pytest.approx(want, rel=1e-6)
    assert m["sft_nll"] == pytest.approx(1.0) and m["loss"] == pytest.approx(want, rel=1e-6)
    assert vrpo_loss(*args, beta=0.5)[0].item() == pytest.approx(nls(0.5), rel=1e-6)
    with pytest.raises(ValueError, match="sft_weight"):
        VRPOConfig(sft_weight=-1.0)


def test_update_gradient_is_dpo_plus_sft(models):
    """One VRPO update with sft_weight: the gradient equals that of the loss written out by hand from
    the two models' ELBOs on the update's own plans."""
    from rlgen.algos.vrpo import VRPO, pair_plans
    from rlgen.batches import TextPairBucket, TextPairs

    from engines import RecordingEngine, context

    policy, ref = models
    p, w, l = batch(B=3, L=4)
    bucket = TextPairBucket(rows=torch.arange(3), prompt_ids=p, chosen_ids=w, rejected_ids=l,
                            weight=torch.ones(3))
    cfg = VRPOConfig(beta=0.7, n_samples=3, sft_weight=0.5)
    engine = RecordingEngine(policy)
    m = VRPO(cfg).update(context(policy, engine, ref), TextPairs([bucket], global_size=3, seed=11))
    plan_p, plan_r = pair_plans(torch.arange(3), 11, 4, cfg)
    prompts, answers = torch.cat([p, p]), torch.cat([w, l])
    e_w, e_l = elbo_from_plan(policy, prompts, answers, plan_p, ref.mask_id).chunk(2)
    with torch.no_grad():
        r_w, r_l = elbo_from_plan(ref, prompts, answers, plan_r, ref.mask_id).chunk(2)
    s = 0.7 * ((e_w - r_w) - (e_l - r_l))
    loss = (torch.log1p(torch.exp(-s)) + 0.5 * (-e_w / 4)).mean()
    loss.backward()
    for p_, g in zip(engine.params, engine.grads[0]):
        if p_.grad is not None:
            assert torch.allclose(g, p_.grad, atol=1e-6, rtol=1e-4)
        p_.grad = None
    assert m["sft_nll"] == pytest.approx((-e_w / 4).mean().item(), rel=1e-5)
    assert m["score_var_naive"] > m["score_var_antithetic"] > 0


def test_variance_estimates_match_repeated_draws(models):
    """The per-update estimates (S²/n from one draw's n samples, i.i.d. allocation) agree with the
    variance over repeated independent draws of both estimators."""
    from rlgen.algos.vrpo import score_variance_estimates

    policy, ref = models
    p, w, l = batch(B=6)
    prompts, answers = torch.cat([p, p]), torch.cat([w, l])
    n, est = 4, []
    with torch.no_grad():
        for s in range(30):
            plan = make_mask_plan(12, 4, n, torch.Generator().manual_seed(s), allocation="naive")
            _, ps = elbo_from_plan(policy, prompts, answers, plan, ref.mask_id, return_samples=True)
            _, rs = elbo_from_plan(ref, prompts, answers, plan, ref.mask_id, return_samples=True)
            est.append(score_variance_estimates(*ps.chunk(2, 1), *rs.chunk(2, 1), beta=1.0))

    def var(cfg):
        draws = torch.stack([preference_score(policy, ref, p, w, l, ref.mask_id, cfg,
                                              torch.Generator().manual_seed(100 + s)) for s in range(60)])
        return draws.double().var(0).mean().item()

    naive = var(VRPOConfig(beta=1.0, n_samples=n, antithetic=False, allocation="naive"))
    anti = var(VRPOConfig(beta=1.0, n_samples=n, antithetic=True, allocation="naive"))
    for key, want in (("score_var_naive", naive), ("score_var_antithetic", anti)):
        got = sum(e[key] for e in est) / len(est)
        assert got == pytest.approx(want, rel=0.35), key
