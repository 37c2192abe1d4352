"""TempBalance options: one validated frozen dataclass behind the constructor and the attributes.

Oracles: the constructor signature (the documented keyword arguments and defaults), the error
texts users saw before the options moved into `TempBalanceOptions` (written here literally),
the linear-map formula written here, and the state_dict keys of the documented format.
"""
import dataclasses
import inspect
import math

import numpy as np
import pytest
import torch
from torch import nn

from tbfast.tempbalance import TempBalance
from tbfast.tempbalance.options import TempBalanceOptions


def net():
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(64, 64) for _ in range(5)])


class Table:
    def __init__(self, names, alpha):
        self.names = list(names)
        self.cols = {"alpha": np.asarray(alpha, dtype=np.float64), "num_evals": np.full(len(names), 64.0)}

    def __getitem__(self, key):
        return self.cols[key]


ALPHAS = [2.0, 3.0, 5.0, 4.0, 6.0]


def fixed(model):
    table = Table([n for n, m in model.named_modules() if isinstance(m, nn.Linear)], ALPHAS)
    return lambda _: table


def test_signature_defaults_are_the_options_defaults():
    params = inspect.signature(TempBalance.__init__).parameters
    fields = {f.name: f.default for f in dataclasses.fields(TempBalanceOptions)}
    assert set(params) - {"self", "net", "backend"} == set(fields)
    for name, default in fields.items():
        want = None if name == "fit_backend" else default  # fit_backend / backend: None = "auto"
        assert params[name].default == want, name
    assert params["backend"].default is None and TempBalance(net()).fit_backend == "auto"
    # the original's positional order is kept
    assert list(params)[2:19] == ["EVALS_THRESH", "bins", "conv_norm", "pl_fitting", "xmin_pos", "filter_zeros",
                                  "remove_first_layer", "remove_last_layer", "eigs_thresh", "esd_metric_for_tb",
                                  "assign_func", "lr_min_ratio", "lr_max_ratio", "batchnorm", "batchnorm_type",
                                  "layernorm", "tau"]


@pytest.mark.parametrize("kw, message", [
    (dict(xmin_pos=0), "xmin_pos and conv_norm must be > 0 and bins >= 1 (got 0, 0.5, 100)"),
    (dict(eigs_thresh=-1), "eigs_thresh and start_step must be >= 0 (got -1, 0)"),
    (dict(linear_map_equal="top"), "linear_map_equal must be 'mid' or 'reference', got 'top'"),
    (dict(balance="momentum"), "balance must be one of ('lr', 'weight_decay', 'both'), got 'momentum'"),
    (dict(flat_policy="drop"), "flat_policy must be one of ('keep', 'untuned'), got 'drop'"),
    (dict(lr_min_ratio=0.5, lr_slope=-1.0), "lr_min_ratio + lr_slope must be >= 0, got 0.5 + -1.0"),
    (dict(asynchronous=True, metrics_fn=lambda n: None),
     "asynchronous=True computes the ESD of a weight snapshot with tbfast's own pipeline; it cannot be "
     "combined with metrics_fn"),
    (dict(assign_func="tb_sigmoid", tau=0), "tb_sigmoid: tau must be finite and > 0, got 0.0"),
])
def test_error_messages_unchanged(kw, message):
    with pytest.raises(ValueError) as err:
        TempBalance(net(), **kw)
    assert str(err.value) == message
    with pytest.raises(ValueError) as err2:
        TempBalanceOptions(**kw)
    assert str(err2.value) == message


def test_not_a_module():
    with pytest.raises(TypeError, match="TempBalance expects an nn.Module, got list"):
        TempBalance([])


def test_options_are_attributes_and_setting_one_validates_it():
    model = net()
    tb = TempBalance(model, metrics_fn=fixed(model), lr_min_ratio=0.6, lr_max_ratio=1.2)
    assert tb.lr_min_ratio == 0.6 and tb.options.lr_max_ratio == 1.2
    assert tb.lr_slope == pytest.approx(0.6)  # resolved default lr_max_ratio - lr_min_ratio
    with pytest.raises(ValueError, match="granularity must be one of"):
        tb.granularity = "head"
    assert tb.granularity == "layer"  # the failed assignment left the options as they were
    with pytest.raises(dataclasses.FrozenInstanceError):
        tb.options.lr_min_ratio = 0.1
    tb.lr_min_ratio = 0.8  # takes effect at the next plan, like an attribute of the original
    ratios = tb.update()
    tuned = ALPHAS[1:-1]  # first and last layers removed
    lo, hi = min(tuned), max(tuned)
    want = [0.8 + (a - lo) / (hi - lo) * (1.2 - 0.8) for a in tuned]
    assert list(ratios.values()) == pytest.approx(want, rel=1e-12)


def test_fit_backend_and_its_alias():
    assert TempBalance(net(), backend="torch").fit_backend == "torch"
    tb = TempBalance(net(), fit_backend="cpp")
    assert tb.backend == "cpp" and tb.options.fit_backend == "cpp"
    with pytest.raises(TypeError, match="TempBalance: pass either fit_backend= or its alias backend=, not both"):
        TempBalance(net(), fit_backend="cpp", backend="torch")
    # the option reaches the fit: an unknown backend is rejected by the pipeline
    with pytest.raises(ValueError, match="unknown fit backend 'nope'"):
        TempBalance(net(), fit_backend="nope").compute_metrics()


def test_state_dict_format_and_an_old_checkpoint():
    model = net()
    tb = TempBalance(model, metrics_fn=fixed(model))
    tb.build_optimizer_param_group(0.1)
    state = tb.state_dict()
    assert set(state) == {"schedule_step", "pending_esd", "step_count", "ratios", "scores", "tuned_layers",
                          "layer_ratio", "granularity", "fingerprint"}
    # the fingerprint: every analysed layer with its weight shape, and the schedule options
    assert state["fingerprint"]["layers"] == [[n, list(m.weight.shape)] for n, m in model.named_modules()
                                              if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert state["fingerprint"]["options"]["lr_max_ratio"] == 1.5
    assert state["pending_esd"] is None and state["granularity"] == "layer"
    # a state written by an earlier tbfast (no schedule_step / pending_esd / layer_ratio keys)
    old = {"step_count": 7, "ratios": {"1": 0.5, "2": 1.5, "3": 1.0}, "scores": {"1": 3.0, "2": 5.0, "3": 4.0},
           "tuned_layers": ["1", "2", "3"], "granularity": "layer"}
    tb2 = TempBalance(model, metrics_fn=fixed(model))
    tb2.load_state_dict(old)
    assert tb2.step_count == 7 and tb2.schedule_step == 7 and tb2.ratios == old["ratios"]
    groups, _ = tb2.build_optimizer_param_group(0.1)  # a new ESD replaces the restored schedule
    assert math.isclose(groups[0]["lr"], 0.1 * 0.5)  # alpha 3 is the smallest tuned score


def test_a_fresh_scheduler_pickles_with_its_options():
    import pickle

    tb = TempBalance(net(), assign_func="tb_sigmoid", s=(2.0, 1.0), granularity="block")
    tb2 = pickle.loads(pickle.dumps(tb))
    assert tb2.options == tb.options and tb2.s == (2.0, 1.0) and tb2.granularity == "block"
