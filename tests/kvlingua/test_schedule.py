"""The shared warm-up + cosine schedule and the per-epoch batch order, against hand-computed values."""
import pytest
import torch

from kvlingua.schedule import epoch_order, lr_factor, warmup_cosine

# total=20, warmup_frac=0.25: 5 warm-up steps (s/5), then the cosine over the 15 steps 5..20.
# Progress (s-5)/15 is 1/3 at s=10, 1/2 at s=12.5, 2/3 at s=15: cos(pi/3)=1/2, cos(2pi/3)=-1/2.
HAND = {0: 0.0, 1: 0.2, 4: 0.8, 5: 1.0, 10: 0.75, 15: 0.25, 20: 0.0, 25: 0.0}


@pytest.mark.parametrize("step,expected", sorted(HAND.items()))
def test_lr_factor_matches_hand_values(step, expected):
    assert lr_factor(step, 20, 0.25) == pytest.approx(expected, abs=1e-12)


def test_lr_factor_floor_and_edges():
    # Cosine to a floor: 0.1 + 0.9 * (1 + cos(pi * t)) / 2.
    assert lr_factor(10, 20, 0.25, min_lr_ratio=0.1) == pytest.approx(0.775)
    assert lr_factor(15, 20, 0.25, min_lr_ratio=0.1) == pytest.approx(0.325)
    assert lr_factor(20, 20, 0.25, min_lr_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(5, 20, 0.25, min_lr_ratio=0.1) == 1.0
    # No warm-up: the first step is at the peak; 200 steps at 5% warm up over 10 steps.
    assert lr_factor(0, 7, 0.0) == 1.0
    assert lr_factor(3, 200, 0.05) == pytest.approx(0.3) and lr_factor(10, 200, 0.05) == 1.0
    # The warm-up length is rounded, not truncated: 5% of 30 steps is 1.5 -> 2 warm-up steps.
    assert lr_factor(1, 30, 0.05) == pytest.approx(0.5) and lr_factor(2, 30, 0.05) == 1.0
    # 100 steps at 5%: progress (52.5 - 5) / 95 = 1/2 falls between steps; check its neighbours bracket 1/2.
    assert lr_factor(52, 100, 0.05) > 0.5 > lr_factor(53, 100, 0.05)


@pytest.mark.parametrize("args,kw,match", [((0, 0, 0.1), {}, "total"), ((0, 10, 1.0), {}, "warmup_frac"),
                                           ((0, 10, -0.1), {}, "warmup_frac"),
                                           ((0, 10, 0.1), {"min_lr_ratio": 1.5}, "min_lr_ratio")])
def test_lr_factor_refuses_bad_arguments(args, kw, match):
    with pytest.raises(ValueError, match=match):
        lr_factor(*args, **kw)


def _lrs(opt, sched, steps):
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_warmup_cosine_drives_the_optimizer_and_resumes():
    w = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([w], lr=2.0)
    sched = warmup_cosine(opt, 20, 0.25)
    lrs = _lrs(opt, sched, 21)  # the lr of steps 0..20
    for step, factor in HAND.items():
        if step <= 20:
            assert lrs[step] == pytest.approx(2.0 * factor, abs=1e-12), step
    # A scheduler rebuilt from a state_dict after 8 steps continues exactly where the first one was.
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(3))], lr=2.0)
    first = warmup_cosine(opt2, 20, 0.25)
    _lrs(opt2, first, 8)
    opt3 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(3))], lr=2.0)
    resumed = warmup_cosine(opt3, 20, 0.25)
    opt3.load_state_dict(opt2.state_dict())
    resumed.load_state_dict(first.state_dict())
    assert _lrs(opt3, resumed, 13) == lrs[8:21]
    with pytest.raises(ValueError, match="warmup_frac"):
        warmup_cosine(opt, 20, 1.0)


# The orders existing runs' batches have always been visited in, written down once: a change to how an epoch's
# order is drawn changes which batch a resumed or repeated run reads at each step.
PINNED_ORDERS = {
    (10, 0, 0): [4, 1, 7, 5, 3, 9, 0, 8, 6, 2],
    (10, 0, 3): [6, 0, 3, 7, 8, 5, 1, 9, 2, 4],
    (37, 2, 1): [19, 13, 12, 27, 35, 11, 2, 21, 1, 8, 3, 17, 6, 5, 9, 20, 22, 26, 28, 16, 25, 31, 30, 32, 36, 10,
                 29, 18, 24, 0, 33, 15, 34, 23, 14, 4, 7],
    (1, 5, 0): [0],
}


@pytest.mark.parametrize("n,seed,epoch", sorted(PINNED_ORDERS))
def test_epoch_order_is_the_order_the_batches_have_always_used(n, seed, epoch):
    assert epoch_order(n, seed, epoch).tolist() == PINNED_ORDERS[(n, seed, epoch)]


def test_epoch_order_is_a_fresh_permutation_per_epoch_and_seed():
    orders = {(s, e): epoch_order(50, s, e) for s in (0, 1) for e in (0, 1)}
    for order in orders.values():
        assert order.dtype == torch.int64 and order.shape == (50,)
        assert sorted(order.tolist()) == list(range(50))
    assert len({tuple(o.tolist()) for o in orders.values()}) == 4
    assert torch.equal(epoch_order(50, 1, 1), orders[(1, 1)])  # deterministic
    assert epoch_order(0, 0, 0).shape == (0,)
    with pytest.raises(ValueError, match="n must be"):
        epoch_order(-1, 0, 0)
    with pytest.raises(ValueError, match="epoch"):
        epoch_order(5, 0, -1)
