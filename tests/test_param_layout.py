"""tbfast.tempbalance.layout: which parameters follow which schedule key, and optimizer groups -> keys.

The expected layouts are written out by hand from the coupling rules of SPEC section 6
(BatchNorm by name / by order, LayerNorm after its Linear) and the block rule of section 7.
"""
import pytest
import torch
from torch import nn

from tbfast.tempbalance.layout import group_keys, optimizer_groups, param_keys, param_layout
from tbfast.tempbalance.options import TempBalanceOptions


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3)
        self.bn1 = nn.BatchNorm2d(4)
        self.stage = nn.Sequential(nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))
        self.fc = nn.Linear(4, 4)
        self.ln = nn.LayerNorm(4)
        self.out = nn.Linear(4, 2)


class Blocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 4)
        self.h = nn.ModuleList([nn.ModuleDict({"q": nn.Linear(4, 4), "ln": nn.LayerNorm(4)}) for _ in range(2)])
        self.head = nn.Linear(4, 2)


def ids(params):
    return [id(p) for p in params]


def test_layer_granularity_couples_bn_by_name_and_ln():
    net = CNN()
    keys = ["conv1", "stage.0", "fc"]
    groups, untuned = param_layout(net, keys, TempBalanceOptions(layernorm=True))
    assert [(label, key) for label, key, _ in groups] == [
        ("conv1", "conv1"), ("bn1", "conv1"), ("stage.0", "stage.0"), ("fc", "fc"), ("ln", "fc")]
    assert ids(groups[1][2]) == ids(net.bn1.parameters())
    # stage.1 (a BN whose name has no 'bn') and 'out' are untuned
    assert ids(untuned) == ids(net.stage[1].parameters()) + ids(net.out.parameters())


def test_bn_by_order_and_switches_off():
    net = CNN()
    groups, untuned = param_layout(net, ["conv1", "stage.0"], TempBalanceOptions(batchnorm_type="order"))
    assert [(label, key) for label, key, _ in groups] == [
        ("conv1", "conv1"), ("bn1", "conv1"), ("stage.0", "stage.0"), ("stage.1", "stage.0")]
    groups, untuned = param_layout(net, ["conv1"], TempBalanceOptions(batchnorm=False))
    assert [label for label, _, _ in groups] == ["conv1"]
    assert len(untuned) == len(list(net.parameters())) - 2


def test_block_and_layer_in_block():
    net = Blocks()
    groups, untuned = param_layout(net, ["block.0", "block.1"], TempBalanceOptions(granularity="block"))
    assert [key for _, key, _ in groups] == ["block.0", "block.1"]
    assert ids(groups[1][2]) == ids(net.h[1].parameters())
    assert ids(untuned) == ids(net.inp.parameters()) + ids(net.head.parameters())
    keys = ["block.0", "block.1", "h.0.q"]  # 'layer_in_block': h.0.q is its own key, the rest of block 0 not
    groups, _ = param_layout(net, keys, TempBalanceOptions(granularity="layer_in_block"))
    layout = {key: ids(params) for _, key, params in groups}
    assert layout["h.0.q"] == ids(net.h[0]["q"].parameters())
    assert layout["block.0"] == ids(net.h[0]["ln"].parameters())
    assert layout["block.1"] == ids(net.h[1].parameters())


def test_group_keys_match_by_identity_and_name_the_group():
    net = CNN()
    layout = param_layout(net, ["conv1", "fc"], TempBalanceOptions())
    keys = param_keys(layout)
    assert keys[id(net.bn1.weight)] == "conv1" and keys[id(net.out.weight)] is None
    groups = [{"params": list(net.fc.parameters())}, {"params": [net.out.weight]}, {"params": []}]
    assert group_keys(groups, keys) == ["fc", None, None]
    names = {id(p): n for n, p in net.named_parameters()}
    with pytest.raises(ValueError, match=r"param group 0 mixes .*'fc': 'fc.weight'"):
        group_keys([{"params": [net.fc.weight, net.conv1.weight]}], keys, names)
    with pytest.raises(ValueError, match=r"param group 1 holds a parameter of shape \(3,\)"):
        group_keys([{"params": [net.fc.bias]}, {"params": [nn.Parameter(torch.zeros(3))]}], keys)


def test_optimizer_groups_of_wrappers():
    opt = torch.optim.SGD(CNN().parameters(), lr=0.1)

    class Wrapper:
        optimizer = opt

    assert optimizer_groups(opt) is opt.param_groups and optimizer_groups(Wrapper()) is opt.param_groups
    with pytest.raises(TypeError, match="object has no param_groups"):
        optimizer_groups(object())
