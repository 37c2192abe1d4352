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
