"""Bad learning rates and foreign or broken states are refused before anything changes (issue 20 items 3, 4).

Oracles: a deep copy of the optimizer's param groups / the scheduler's state taken before the
call (unchanged after the error), the saved factors themselves (what strict=False must load).
"""
import copy
import io
import json
import logging
import math

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler as lrs

from tbfast import TempBalance

LR = 0.1
ALPHAS = [2.0, 2.5, 4.0, 6.0, 3.0, 5.0, 2.2]


def mlp(widths=(16, 16, 16, 16)):
    torch.manual_seed(0)
    layers, d = [], 8
    for w in widths:
        layers += [nn.Linear(d, w), nn.ReLU()]
        d = w
    return nn.Sequential(*layers, nn.Linear(d, 3))


class Fixed:
    """metrics_fn: fixed alphas, one per Linear layer."""

    def __init__(self, model):
        self.names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        self.alpha = ALPHAS[:len(self.names)]

    def __call__(self, net):
        return self

    def __getitem__(self, key):
        if key == "alpha":
            return self.alpha
        if key == "num_evals":
            return [100] * len(self.names)
        raise KeyError(key)


def make(widths=(16, 16, 16, 16), **kw):
    model = mlp(widths)
    tb = TempBalance(model, metrics_fn=Fixed(model), **kw)
    groups, _ = tb.build_optimizer_param_group(LR)
    return model, tb, torch.optim.SGD(groups, lr=LR)


def snapshot(opt):
    return copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups])


def tb_snapshot(tb):
    return (tb.step_count, dict(tb.ratios), dict(tb.scores), list(tb.tuned_layers), tb.schedule_step)


# ----------------------------------------------------------------------------- item 3: learning rates
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -0.1, "fast"])
def test_bad_untuned_lr_is_refused_before_writing(bad):
    model, tb, opt = make()
    with pytest.raises(ValueError, match="build_optimizer_param_group: untuned_lr must be a finite number >= 0"):
        tb.build_optimizer_param_group(bad)
    before, state = snapshot(opt), tb_snapshot(tb)
    with pytest.raises(ValueError, match="step: untuned_lr must be a finite number >= 0"):
        tb.step(opt, bad)
    with pytest.raises(ValueError, match="apply: untuned_lr must be a finite number >= 0"):
        tb.apply(opt, bad)
    assert snapshot(opt) == before and tb_snapshot(tb) == state  # nothing written, no step counted
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_nan_lr_from_a_scheduler_is_refused_naming_the_group():
    model, tb, opt = make()
    sched = lrs.LambdaLR(opt, lambda e: float("nan") if e == 1 else 1.0)
    tb.apply(opt)
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    sched.step()  # the user's lambda gives NaN
    before = snapshot(opt)
    with pytest.raises(ValueError, match="optimizer param group 0 has lr nan"):
        tb.apply(opt)
    assert str(snapshot(opt)) == str(before)  # (NaN != NaN: compare the text)


# ----------------------------------------------------------------------------- item 4: states
def test_state_of_another_model_is_refused_naming_the_first_differing_layer():
    _, tb5, _ = make((16, 16, 16, 16))
    _, tb3, _ = make((16, 16))
    state = tb5.state_dict()
    before = tb_snapshot(tb3)
    with pytest.raises(ValueError, match=r"first differing layer: saved '4' \(16, 16\), this model '4' \(3, 16\)"):
        tb3.load_state_dict(state)
    _, wide, _ = make((16, 32, 16, 16))
    with pytest.raises(ValueError, match=r"first differing layer: saved '2' \(16, 16\), this model '2' \(32, 16\)"):
        wide.load_state_dict(state)
    assert tb_snapshot(tb3) == before


def test_options_that_change_the_schedule_must_match():
    _, tb, _ = make()
    _, other, _ = make(lr_max_ratio=2.0)
    with pytest.raises(ValueError, match=r"lr_max_ratio: saved 1.5, now 2.0"):
        other.load_state_dict(tb.state_dict())
    other.load_state_dict(tb.state_dict(), strict=False)
    assert dict(other.ratios) == dict(tb.ratios)


def test_strict_false_loads_the_layers_that_match(caplog):
    _, tb, _ = make((16, 16, 16, 16))
    tb.step_count = 5
    saved = tb.state_dict()
    model2, tb2, opt2 = make((16, 32, 16, 16))  # layers '2' and '4' changed shape
    tb2.update()
    with caplog.at_level(logging.WARNING, logger="tbfast"):
        tb2.load_state_dict(saved, strict=False)
    assert "left out 2 schedule keys" in caplog.text and "(2, 4)" in caplog.text
    assert dict(tb2.ratios) == {k: v for k, v in saved["ratios"].items() if k not in ("2", "4")}
    assert tb2.tuned_layers == [n for n in saved["tuned_layers"] if n not in ("2", "4")]
    assert tb2.step_count == 5
    # the parameters of the dropped layers are at the untuned lr, the others at the saved factors
    written = tb2.apply(opt2, 0.2)
    keys = tb2.group_keys(opt2)
    for lr, k in zip(written, keys):
        assert math.isclose(lr, 0.2 * saved["ratios"][k] if k is not None else 0.2, rel_tol=1e-12)


@pytest.mark.parametrize("garbage, err, match", [
    (None, TypeError, "expects the dict from state_dict\\(\\), got NoneType"),
    ([1, 2], TypeError, "got list"),
    ({}, ValueError, "missing \\['step_count', 'ratios', 'scores', 'tuned_layers'\\]"),
    ("truncated", ValueError, "missing \\['tuned_layers'\\]"),
    ("truncated_factors", ValueError, "inconsistent \\(truncated\\?\\).*\\['4'\\]"),
    ("nan_factor", ValueError, "ratios\\['4'\\] is nan"),
    ("negative_factor", ValueError, "ratios\\['2'\\] is -1.0"),
    ("bad_step", ValueError, "'step_count' is 'x'"),
    ("bad_fingerprint", ValueError, "'fingerprint' is malformed"),
    ("bad_pending", ValueError, "'pending_esd' is malformed"),
])
def test_garbage_is_a_one_line_error(garbage, err, match):
    _, tb, _ = make()
    good = tb.state_dict()
    if isinstance(garbage, str):
        state = copy.deepcopy(good)
        if garbage == "truncated":
            del state["tuned_layers"]
        elif garbage == "truncated_factors":
            del state["ratios"]["4"]
        elif garbage == "nan_factor":
            state["ratios"]["4"] = float("nan")
        elif garbage == "negative_factor":
            state["ratios"]["2"] = -1.0
        elif garbage == "bad_step":
            state["step_count"] = "x"
        elif garbage == "bad_fingerprint":
            state["fingerprint"] = [1]
        elif garbage == "bad_pending":
            state["pending_esd"] = {"oops": 1}
        garbage = state
    before = tb_snapshot(tb)
    with pytest.raises(err, match=match) as info:
        tb.load_state_dict(garbage)
    assert "\n" not in str(info.value)
    assert tb_snapshot(tb) == before


def test_old_state_without_fingerprint_loads_with_a_warning_but_keys_are_checked(caplog):
    _, tb, _ = make()
    old = {k: v for k, v in tb.state_dict().items() if k != "fingerprint"}
    _, tb2, _ = make()
    with caplog.at_level(logging.WARNING, logger="tbfast"):
        tb2.load_state_dict(old)
    assert "has no fingerprint" in caplog.text
    assert dict(tb2.ratios) == old["ratios"]
    _, small, _ = make((16, 16))  # Linear layers '0', '2', '4': the saved tuned layer '6' is not one
    with pytest.raises(ValueError, match="schedule key '6' is no analysed layer"):
        small.load_state_dict(old)


def test_state_round_trips_through_json_and_weights_only_torch_load():
    _, tb, _ = make()
    state = tb.state_dict()
    _, tb2, _ = make()
    tb2.load_state_dict(json.loads(json.dumps(state)))
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    _, tb3, _ = make()
    tb3.load_state_dict(torch.load(buf, weights_only=True))
    assert dict(tb2.ratios) == dict(tb3.ratios) == state["ratios"]


class Blocks(nn.Module):
    def __init__(self, mid=16):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(8, 16)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(16, w), nn.Linear(w, 16)) for w in (16, mid, 16)])
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        x = self.inp(x)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def test_block_states_strict_and_partial():
    def make_blocks(mid):
        model = Blocks(mid)
        table = Fixed(model)
        table.alpha = [2.0, 3.0, 4.0, 2.5, 6.0, 5.0, 2.2, 3.3]
        tb = TempBalance(model, metrics_fn=table, granularity="block", remove_first_layer=False,
                         remove_last_layer=False)
        tb.update()
        return tb

    tb = make_blocks(16)
    saved = json.loads(json.dumps(tb.state_dict()))
    assert set(saved["ratios"]) == {"block.0", "block.1", "block.2"}
    same = make_blocks(16)
    same.load_state_dict(saved)
    assert dict(same.ratios) == saved["ratios"]
    other = make_blocks(32)  # block 1 has other shapes
    with pytest.raises(ValueError, match=r"first differing layer: saved 'blocks.1.0' \(16, 16\), this model "
                                         r"'blocks.1.0' \(32, 16\)"):
        other.load_state_dict(saved)
    other.load_state_dict(saved, strict=False)
    assert dict(other.ratios) == {k: v for k, v in saved["ratios"].items() if k != "block.1"}


# ----------------------------------------------------------------------------- s3's entries in s1's state
BAL = dict(balance="both", wd_min_ratio=0.5, wd_max_ratio=3.0, ramp_steps=3)


def mid_ramp(widths=(16, 16, 16, 16)):
    """A scheduler (separate weight-decay range, ramp 3) one step into the ramp of a refresh whose
    alphas differ from the build's, and its optimizer (weight decay 0.01)."""
    model = mlp(widths)
    tb = TempBalance(model, metrics_fn=Fixed(model), **BAL)
    groups, _ = tb.build_optimizer_param_group(LR)
    opt = torch.optim.SGD(groups, lr=LR, weight_decay=0.01)
    tb.metrics_fn.alpha = tb.metrics_fn.alpha[::-1]
    tb.step(opt, LR)
    return model, tb, opt


def test_ramp_and_weight_decay_factors_are_checked_like_the_factors():
    _, tb, _ = mid_ramp()
    good = tb.state_dict()
    assert set(good["wd_ratios"]) == set(good["ratios"]) and good["ramp"]["start"] == 1
    cases = [
        (lambda s: s["wd_ratios"].update({"4": float("nan")}), r"wd_ratios\['4'\] is nan"),
        (lambda s: s["wd_ratios"].pop("4"), r"inconsistent \(truncated\?\): 'wd_ratios' and 'ratios' differ in \['4'\]"),
        (lambda s: s.update(ramp=[1]), r"'ramp' is malformed"),
        (lambda s: s["ramp"].update(start="x"), r"'ramp' is malformed"),
        (lambda s: s["ramp"]["old"]["wd"].update({"2": -1.0}), r"ramp\['old'\]\['wd'\]\['2'\] is -1.0"),
        (lambda s: s["ramp"]["old"].update(momentum={}), r"'ramp' has an unknown channel 'momentum'"),
    ]
    for spoil, match in cases:
        state = copy.deepcopy(good)
        spoil(state)
        _, tb2, _ = mid_ramp()
        before = (tb_snapshot(tb2), dict(tb2.wd_ratios), tb2._ramp.to_state())
        with pytest.raises(ValueError, match=match) as info:
            tb2.load_state_dict(state)
        assert "\n" not in str(info.value)
        assert (tb_snapshot(tb2), dict(tb2.wd_ratios), tb2._ramp.to_state()) == before


def test_strict_false_keeps_the_ramp_and_weight_decay_of_matching_layers():
    """Oracle: the ramp formula of docs/TEMPBALANCE.md on the saved old / target factors,
    f(c) = old + (new - old) * min(1, (c - r + 1) / M), for the layers whose shapes match."""
    _, tb, _ = mid_ramp()
    saved = json.loads(json.dumps(tb.state_dict()))  # as the HF callback stores it
    _, tb2, opt2 = mid_ramp((16, 32, 16, 16))  # layers '2' and '4' changed shape
    tb2.load_state_dict(saved, strict=False)
    assert dict(tb2.wd_ratios) == {k: v for k, v in saved["wd_ratios"].items() if k not in ("2", "4")}
    assert set(tb2._ramp.to_state()["old"]["wd"]) == set(saved["ramp"]["old"]["wd"]) - {"2", "4"}
    for g in opt2.param_groups:
        g["weight_decay"] = 0.01  # a fresh untuned weight decay
        g.pop("tempbalance", None)
    tb2.set_step(2)  # step count 2, no new ESD: 2/3 of the way; '2' and '4' untuned until the next ESD
    tb2.apply(opt2, LR)
    r, c, M = saved["ramp"]["start"], 2, 3
    for g, k in zip(opt2.param_groups, tb2.group_keys(opt2)):
        if k is None:
            assert math.isclose(g["weight_decay"], 0.01, rel_tol=1e-12) and math.isclose(g["lr"], LR, rel_tol=1e-12)
            continue
        t = min(1.0, (c - r + 1) / M)
        wd_old, wd_new = saved["ramp"]["old"]["wd"][k], saved["wd_ratios"][k]
        lr_old, lr_new = saved["ramp"]["old"]["lr"][k], saved["ratios"][k]
        assert math.isclose(g["weight_decay"], 0.01 * (wd_old + (wd_new - wd_old) * t), rel_tol=1e-12), k
        assert math.isclose(g["lr"], LR * (lr_old + (lr_new - lr_old) * t), rel_tol=1e-12), k


def test_fingerprint_holds_the_balancing_options_and_the_async_lag():
    _, tb, _ = mid_ramp()
    state = tb.state_dict()
    for change, match in [(dict(ramp_steps=5), "ramp_steps: saved 3, now 5"),
                          (dict(wd_max_ratio=2.0), "wd_max_ratio: saved 3.0, now 2.0"),
                          (dict(refresh_every=4), "refresh_every: saved 1, now 4")]:
        model = mlp()
        other = TempBalance(model, metrics_fn=Fixed(model), **{**BAL, **change})
        with pytest.raises(ValueError, match=match):
            other.load_state_dict(state)
    model = mlp()
    other = TempBalance(model, esd_of="grad", metrics_fn=None, **BAL)
    with pytest.raises(ValueError, match="esd_of: saved 'weight', now 'grad'"):
        other.load_state_dict(state)
    # async_lag decides which step's ESD is in use: compared between asynchronous schedulers only
    with TempBalance(mlp(), asynchronous=True, async_lag=2) as lag2, \
            TempBalance(mlp(), asynchronous=True, async_lag=1) as lag1:
        saved = lag2.state_dict()
        assert saved["fingerprint"]["options"]["async_lag"] == 2
        with pytest.raises(ValueError, match="async_lag: saved 2, now 1"):
            lag1.load_state_dict(saved)
        sync = TempBalance(mlp())
        assert "async_lag" not in sync.state_dict()["fingerprint"]["options"]
        sync.load_state_dict(saved)
