"""Beta moving average: the running update equals the closed-form weighted mean."""
import torch

from alignclip import BetaMovingAverage
from alignclip.bma import beta_weight


def test_beta_weights_match_the_density():
    # Beta(0.5, 0.5).pdf(x) = 1 / (pi sqrt(x (1 - x)))
    x = 3.5 / 11
    assert abs(beta_weight(3, 10, 0.5) - 1 / (torch.pi * (x * (1 - x)) ** 0.5)) < 1e-12
    assert abs(beta_weight(4, 9, 1.0) - 1.0) < 1e-12


def test_update_is_the_weighted_mean_of_the_trajectory():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    total = 6
    bma = BetaMovingAverage(model, total, beta=0.5)
    history = [{k: v.clone().double() for k, v in model.state_dict().items()}]
    for _ in range(total):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model(torch.randn(5, 3))    # moves the BatchNorm running stats and counter
        bma.update()
        history.append({k: v.clone().double() for k, v in model.state_dict().items()})
    w = torch.tensor([beta_weight(t, total, 0.5) for t in range(total + 1)], dtype=torch.float64)
    for name, value in bma.module.state_dict().items():
        if value.is_floating_point():
            want = sum(w[t] * history[t][name] for t in range(total + 1)) / w.sum()
            torch.testing.assert_close(value.double(), want, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(value, history[-1][name].to(value.dtype))


def test_update_is_one_foreach_call_per_dtype(monkeypatch):
    model = torch.nn.Sequential(*[torch.nn.Linear(2, 2) for _ in range(10)])
    bma = BetaMovingAverage(model, 4)
    calls = []
    orig = torch._foreach_lerp_
    monkeypatch.setattr(torch, "_foreach_lerp_", lambda a, b, w: calls.append(len(a)) or orig(a, b, w))
    bma.update()
    assert calls == [20]


def test_state_dict_resumes_exactly():
    torch.manual_seed(1)
    model = torch.nn.Linear(4, 4)
    a = BetaMovingAverage(model, 5)
    a.update()
    state = a.state_dict()
    b = BetaMovingAverage(model, 5)
    b.load_state_dict(state)
    with torch.no_grad():
        model.weight.add_(1.0)
    a.update()
    b.update()
    assert torch.equal(a.module.weight, b.module.weight) and a.weight_sum == b.weight_sum
