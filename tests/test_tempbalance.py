"""tbfast.TempBalance against a reference scheduler written plainly from SPEC sections 6-7.

The reference below uses loops and the formulas of SPEC.md; its metrics come from an fp64
``torch.linalg.svdvals`` oracle with the SPEC fit formulas, never from tbfast.
"""
import copy
import math
import re

import numpy as np
import pytest
import torch
from torch import nn

import tbfast
from tbfast import TempBalance, Tempbalance


# ----------------------------------------------------------------------------- models
class SmallCNN(nn.Module):
    """conv/bn named pairs (coupled by name) plus a Sequential whose BN only order can couple."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.stage = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.conv3 = nn.Conv2d(16, 24, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(24)
        self.fc1 = nn.Linear(24, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = self.stage(x)
        x = torch.relu(self.bn3(self.conv3(x)))
        x = x.mean(dim=(2, 3))
        return self.fc2(torch.relu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln1 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)
        self.ln2 = nn.LayerNorm(d)
        self.d = d

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.d), dim=-1)
        x = self.ln1(x + self.proj(att @ v))
        return self.ln2(x + self.fc2(torch.relu(self.fc1(x))))


class SmallTransformer(nn.Module):
    def __init__(self, d=64, n_blocks=3, vocab=50, n_out=5):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.inp = nn.Linear(d, d)
        self.blocks = nn.ModuleList([Block(d) for _ in range(n_blocks)])
        self.head = nn.Linear(d, n_out)

    def forward(self, tokens):
        x = self.inp(self.embed(tokens))
        for b in self.blocks:
            x = b(x)
        return self.head(x.mean(dim=1))


def heavy_tailed_init(model, seed):
    """Student-t weights with a different tail per layer, so layers get distinct alphas."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i, m in enumerate(model.modules()):
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                df = 1.5 + (i * 0.7) % 4
                t = torch.distributions.StudentT(torch.tensor(df))
                torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
                m.weight.copy_(t.sample(m.weight.shape) * 0.05)
    return model


def cnn(seed=0):
    torch.manual_seed(seed)
    return heavy_tailed_init(SmallCNN(), seed)


def transformer(seed=0):
    torch.manual_seed(seed)
    return heavy_tailed_init(SmallTransformer(), seed)


# ----------------------------------------------------------------------------- metrics oracle
def oracle_evals(module, conv_norm=0.5):
    w = module.weight.detach().double()
    if isinstance(module, nn.Conv2d):
        mats = [w[:, :, a, b] * math.sqrt(conv_norm) for a in range(w.shape[2]) for b in range(w.shape[3])]
    else:
        mats = [w]
    ev = torch.cat([torch.linalg.svdvals(m) ** 2 for m in mats])
    return np.sort(ev.numpy())


def oracle_alpha(e, fit="median", xmin_pos=2.0, filter_zeros=False, thresh=1e-5):
    nz = e[e > thresh] if filter_zeros else e
    if filter_zeros and nz.size == 0:
        nz = e
    N = len(nz)

    def hill(i):
        n = N - i
        return 1 + n / (np.sum(np.log(nz[i:])) - n * np.log(nz[i]))

    def dist(i, a):
        n = N - i
        j = np.arange(n)
        return np.max(np.abs(1 - (nz[i:] / nz[i]) ** (1 - a) - j / n))

    if fit == "median":
        return hill(int(N / xmin_pos))
    best_d, best_a = None, None
    for i in range(N - 1):  # goodness-of-fit scan, first argmin
        a = hill(i)
        d = dist(i, a) if a > 1 else 1.0
        if best_d is None or d < best_d:
            best_d, best_a = d, a
    return best_a


class OracleTable:
    """The per-layer table TempBalance consumes, built by the oracle (fp64 SVD)."""

    def __init__(self, model, fit="median", xmin_pos=2.0, filter_zeros=False):
        self.names, cols = [], {"num_evals": [], "alpha": [], "spectral_norm": [], "stable_rank": []}
        for name, m in model.named_modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                e = oracle_evals(m)
                self.names.append(name)
                cols["num_evals"].append(len(e))
                cols["alpha"].append(oracle_alpha(e, fit, xmin_pos, filter_zeros))
                cols["spectral_norm"].append(e[-1])
                cols["stable_rank"].append(e.sum() / e[-1])
        self.cols = {k: np.array(v, dtype=np.float64) for k, v in cols.items()}
        self.status = ["ok"] * len(self.names)

    def __getitem__(self, key):
        return self.cols[key]

    def __len__(self):
        return len(self.names)


# ----------------------------------------------------------------------------- reference scheduler
DEFAULTS = dict(remove_first_layer=True, remove_last_layer=True, eigs_thresh=50, esd_metric_for_tb="alpha",
                assign_func="tb_linear_map", lr_min_ratio=0.5, lr_max_ratio=1.5, batchnorm=True,
                batchnorm_type="name", layernorm=False, tau=10.0, s=1.0, granularity="layer")


def ref_assign(func, scores, lr, c):
    n = len(scores)
    lo, hi = c["lr_min_ratio"], c["lr_max_ratio"]
    out = []
    for i, x in enumerate(scores):
        if func == "tb_linear_map":
            smin, smax = min(scores), max(scores)
            if smax == smin:
                out.append(hi * lr)  # numpy interp's answer (reference behaviour)
            else:
                out.append(lo * lr + (x - smin) / (smax - smin) * (hi * lr - lo * lr))
        elif func == "tb_sqrt":
            out.append(math.sqrt(x) / sum(math.sqrt(y) for y in scores) * n * lr)
        elif func == "tb_log2":
            out.append(math.log2(x) / sum(math.log2(y) for y in scores) * n * lr)
        elif func == "tb_step":
            r = sum(1 for j, y in enumerate(scores) if y < x or (y == x and j < i))
            out.append(lr * (lo + (hi - lo) * r / n))
        elif func == "tb_sigmoid":
            mean = sum(scores) / n
            d = x - mean
            s = c["s"]
            sd = (s[0] if d <= 0 else s[1]) if isinstance(s, tuple) else s
            out.append(lr * 10 ** (sd * (1 / (1 + math.exp(-c["tau"] * d)) - 0.5)))
    return out


def ref_block(name):
    m = re.match(r"(.*?)\.(\d+)\.(.*)", name)
    return int(m.group(2)) if m else None


def reference_groups(model, table, untuned_lr, **cfg):
    """SPEC 6 steps 1-3 (and SPEC 7 per-block), written plainly. Returns [(params, lr)], layer_count."""
    c = dict(DEFAULTS, **cfg)
    rows = list(range(len(table.names)))
    if c["remove_first_layer"]:
        rows = rows[1:]
    if c["remove_last_layer"]:
        rows = rows[:-1]
    rows = [i for i in rows if table["num_evals"][i] >= c["eigs_thresh"]]
    names = [table.names[i] for i in rows]
    scores = [float(table[c["esd_metric_for_tb"]][i]) for i in rows]
    groups, tuned = [], set()
    if c["granularity"] == "block":
        blocks = []
        for nm in names:
            b = ref_block(nm)
            if b is not None and b not in blocks:
                blocks.append(b)
        means = [np.mean([s for nm, s in zip(names, scores) if ref_block(nm) == b]) for b in blocks]
        lr_of = dict(zip(blocks, ref_assign(c["assign_func"], means, untuned_lr, c)))
        per_block = {}
        for pname, p in model.named_parameters():
            b = ref_block(pname)
            if b in lr_of:
                per_block.setdefault(b, []).append(p)
                tuned.add(id(p))
        groups = [(per_block[b], lr_of[b]) for b in per_block]
    else:
        lr_of = dict(zip(names, ref_assign(c["assign_func"], scores, untuned_lr, c)))
        prev_conv = prev_linear = None
        for name, m in model.named_modules():
            partner = None
            if name in lr_of:
                partner = name
            elif c["batchnorm"] and isinstance(m, nn.BatchNorm2d):
                partner = name.replace("bn", "conv") if c["batchnorm_type"] == "name" else prev_conv
            elif c["layernorm"] and isinstance(m, nn.LayerNorm):
                partner = prev_linear
            if isinstance(m, nn.Conv2d):
                prev_conv = name
            if isinstance(m, nn.Linear):
                prev_linear = name
            if partner in lr_of:
                ps = [p for p in m.parameters() if id(p) not in tuned]
                tuned.update(id(p) for p in ps)
                groups.append((ps, lr_of[partner]))
    layer_count = len(groups)
    groups.append(([p for p in model.parameters() if id(p) not in tuned], untuned_lr))
    return groups, layer_count


def assert_same_groups(ours, layer_count, ref, ref_count, rtol=1e-9):
    assert layer_count == ref_count
    assert len(ours) == len(ref)
    for g, (ps, lr) in zip(ours, ref):
        assert [id(p) for p in g["params"]] == [id(p) for p in ps]
        assert math.isclose(g["lr"], lr, rel_tol=rtol), (g["lr"], lr)


# ----------------------------------------------------------------------------- parity given the same metrics
CNN_CASES = [
    dict(),
    dict(assign_func="tb_sqrt"),
    dict(assign_func="tb_log2"),
    dict(assign_func="tb_step"),
    dict(assign_func="tb_sigmoid", tau=10.0, s=0.5),
    dict(assign_func="tb_sigmoid", tau=3.0, s=(2.0, 1.0)),
    dict(batchnorm_type="order"),
    dict(batchnorm=False),
    dict(remove_first_layer=False, remove_last_layer=False, eigs_thresh=0),
    dict(eigs_thresh=100),
    dict(lr_min_ratio=0.6, lr_max_ratio=1.4, assign_func="tb_step"),
    dict(esd_metric_for_tb="stable_rank"),
    dict(esd_metric_for_tb="spectral_norm", assign_func="tb_sqrt"),
]


@pytest.mark.parametrize("cfg", CNN_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "defaults")
def test_cnn_parity_same_metrics(cfg):
    model = cnn()
    table = OracleTable(model)
    tb = TempBalance(model, metrics_fn=lambda net: table, **cfg)
    groups, count = tb.build_optimizer_param_group(untuned_lr=0.1)
    ref, ref_count = reference_groups(model, table, 0.1, **cfg)
    assert_same_groups(groups, count, ref, ref_count)
    assert count >= 2  # the case really schedules something


def test_bn_coupling_by_name_and_order_differ_as_specified():
    model = cnn()
    table = OracleTable(model)
    by_name, _ = TempBalance(model, metrics_fn=lambda n: table).build_optimizer_param_group(0.1)
    by_order, _ = TempBalance(model, metrics_fn=lambda n: table, batchnorm_type="order").build_optimizer_param_group(0.1)
    seq_bn = {id(p) for p in model.stage[1].parameters()}
    tuned = lambda gs: {id(p) for g in gs[:-1] for p in g["params"]}  # noqa: E731
    assert not seq_bn & tuned(by_name)  # 'stage.1' has no 'bn' in its name
    assert seq_bn <= tuned(by_order)  # nearest preceding conv is 'stage.0'
    lr_order = {id(p): g["lr"] for g in by_order for p in g["params"]}
    lr_conv = lr_order[id(model.stage[0].weight)]
    assert all(lr_order[i] == lr_conv for i in seq_bn)


TF_CASES = [
    dict(eigs_thresh=50),
    dict(layernorm=True),
    dict(layernorm=True, assign_func="tb_sigmoid", s=(2.0, 1.0)),
    dict(assign_func="tb_log2", remove_first_layer=False),
    dict(granularity="block", assign_func="tb_sigmoid", s=(2.0, 1.0)),
    dict(granularity="block", assign_func="tb_linear_map", remove_first_layer=False),
]


@pytest.mark.parametrize("cfg", TF_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_transformer_parity_same_metrics(cfg):
    model = transformer()
    table = OracleTable(model)
    tb = TempBalance(model, metrics_fn=lambda net: table, **cfg)
    groups, count = tb.build_optimizer_param_group(untuned_lr=1e-3)
    ref, ref_count = reference_groups(model, table, 1e-3, **cfg)
    assert_same_groups(groups, count, ref, ref_count)
    if cfg.get("granularity") == "block":
        assert count == 3
        ln = {id(p) for p in model.blocks[1].ln2.parameters()}
        lrs = {id(p): g["lr"] for g in groups for p in g["params"]}
        assert {lrs[i] for i in ln} == {lrs[id(model.blocks[1].qkv.weight)]}
        assert lrs[id(model.embed.weight)] == 1e-3 and lrs[id(model.head.bias)] == 1e-3


def test_step_writes_same_lrs_as_reference():
    model = cnn()
    table = OracleTable(model)
    tb = TempBalance(model, metrics_fn=lambda net: table, assign_func="tb_sqrt")
    groups, count = tb.build_optimizer_param_group(0.1)
    opt = torch.optim.SGD(groups, lr=0.1, momentum=0.9)
    tb.step(opt, 0.03)
    ref, _ = reference_groups(model, table, 0.03, assign_func="tb_sqrt")
    for g, (_, lr) in zip(opt.param_groups, ref):
        assert math.isclose(g["lr"], lr, rel_tol=1e-9)


# ----------------------------------------------------------------------------- TB_Sigmoid per block by hand
class FixedAlphas:
    def __init__(self, model, alphas):
        self.names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        self.cols = {"alpha": np.array([alphas.get(n, 3.0) for n in self.names]),
                     "num_evals": np.full(len(self.names), 64.0)}
        self.status = ["ok"] * len(self.names)

    def __getitem__(self, k):
        return self.cols[k]


def test_sigmoid_per_block_hand_values():
    model = transformer()
    # block means 2, 3, 4 (per-layer values chosen around them); inp/head are outside blocks
    alphas = {}
    for b, mean in enumerate([2.0, 3.0, 4.0]):
        for name, dev in zip(["qkv", "proj", "fc1", "fc2"], [-0.5, 0.5, -0.25, 0.25]):
            alphas[f"blocks.{b}.{name}"] = mean + dev
    alphas["inp"], alphas["head"] = 100.0, 100.0  # must not enter the block statistics
    table = FixedAlphas(model, alphas)
    tb = TempBalance(model, metrics_fn=lambda net: table, assign_func="tb_sigmoid", tau=10, s=(2, 1),
                     granularity="block", remove_first_layer=False, remove_last_layer=False)
    groups, count = tb.build_optimizer_param_group(1e-3)
    # 1e-3 * 10 ** (s * (1 / (1 + e^(-10 d)) - 0.5)) for d = -1, 0, +1, computed by hand
    expected = [0.00010002090867670476, 0.001, 0.003161947116795425]
    assert count == 3
    for g, want in zip(groups[:3], expected):
        assert math.isclose(g["lr"], want, rel_tol=1e-12)
    assert groups[3]["lr"] == 1e-3
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in model.blocks[1].parameters()}


def test_layer_in_block_variant():
    model = transformer()
    alphas = {f"blocks.{b}.{n}": 2.0 + b + d for b in range(3)
              for n, d in zip(["qkv", "proj", "fc1", "fc2"], [0.0, 1.0, 0.5, 0.5])}
    table = FixedAlphas(model, alphas)
    tb = TempBalance(model, metrics_fn=lambda net: table, assign_func="tb_linear_map", granularity="layer_in_block",
                     lr_min_ratio=0.5, lr_max_ratio=1.5, lr_slope=1.0)
    groups, _ = tb.build_optimizer_param_group(1.0)
    lrs = {id(p): g["lr"] for g in groups for p in g["params"]}
    # block means 2.5, 3.5, 4.5 -> block lrs 0.5, 1.0, 1.5; inside a block alpha 2+b -> 0.5x, 3+b -> 1.5x
    for b, blr in enumerate([0.5, 1.0, 1.5]):
        blk = model.blocks[b]
        assert math.isclose(lrs[id(blk.qkv.weight)], 0.5 * blr)
        assert math.isclose(lrs[id(blk.proj.weight)], 1.5 * blr)
        assert math.isclose(lrs[id(blk.fc1.bias)], 1.0 * blr)
        assert math.isclose(lrs[id(blk.ln1.weight)], blr)  # rest of the block: block lr
    assert lrs[id(model.head.weight)] == 1.0


def test_normalize_and_weight_decay_balance():
    model = cnn()
    table = OracleTable(model)
    tb = TempBalance(model, metrics_fn=lambda n: table, assign_func="tb_sigmoid", normalize=True, balance="both")
    groups, count = tb.build_optimizer_param_group(0.1)
    assert math.isclose(np.mean(list(tb.ratios.values())), 1.0, rel_tol=1e-12)
    opt = torch.optim.AdamW(groups, lr=0.1, weight_decay=0.01)
    written = tb.step(opt, 0.1)
    for g, lr in zip(opt.param_groups[:count], written):
        assert math.isclose(g["weight_decay"], 0.01 * lr / 0.1, rel_tol=1e-12)
    assert opt.param_groups[-1]["weight_decay"] == 0.01
    tb2 = TempBalance(model, metrics_fn=lambda n: table, balance="weight_decay")
    g2, _ = tb2.build_optimizer_param_group(0.1)
    opt2 = torch.optim.SGD(g2, lr=0.1, weight_decay=1e-4)
    tb2.step(opt2, 0.1)
    assert all(g["lr"] == 0.1 for g in opt2.param_groups)
    assert len({g["weight_decay"] for g in opt2.param_groups}) > 2


def test_start_step_delays_balancing():
    model = cnn()
    table = OracleTable(model)
    calls = []
    tb = TempBalance(model, metrics_fn=lambda n: calls.append(1) or table, start_step=2)
    groups, _ = tb.build_optimizer_param_group(0.1)
    assert all(g["lr"] == 0.1 for g in groups)
    opt = torch.optim.SGD(groups, lr=0.1)
    n0 = len(calls)
    tb.step(opt, 0.05)
    assert len(calls) == n0 and all(g["lr"] == 0.05 for g in opt.param_groups)
    tb.step(opt, 0.05)
    assert len(calls) == n0 + 1 and len({g["lr"] for g in opt.param_groups}) > 2


# ----------------------------------------------------------------------------- end to end (tbfast's own ESD)
@pytest.mark.parametrize("assign_func", ["tb_linear_map", "tb_sqrt", "tb_log2", "tb_step", "tb_sigmoid"])
def test_cnn_end_to_end(assign_func):
    model = cnn(seed=1)
    tb = TempBalance(model, assign_func=assign_func, s=0.5)
    groups, count = tb.build_optimizer_param_group(0.1)
    ref, ref_count = reference_groups(model, OracleTable(model), 0.1, assign_func=assign_func, s=0.5)
    assert_same_groups(groups, count, ref, ref_count, rtol=1e-3)
    assert tb.metrics is not None and list(tb.metrics.names)[0] == "conv1"


@pytest.mark.parametrize("pl_fitting", ["median", "goodness-of-fit"])
def test_transformer_end_to_end(pl_fitting):
    model = transformer(seed=2)
    cfg = dict(granularity="block", assign_func="tb_sigmoid", s=(2.0, 1.0), tau=10.0)
    tb = TempBalance(model, pl_fitting=pl_fitting, xmin_pos=1.5, **cfg)
    groups, count = tb.build_optimizer_param_group(1e-3)
    ref, ref_count = reference_groups(model, OracleTable(model, fit=pl_fitting, xmin_pos=1.5), 1e-3, **cfg)
    assert_same_groups(groups, count, ref, ref_count, rtol=1e-3)


# ----------------------------------------------------------------------------- optimizers, model untouched, resume
class SAMLike(torch.optim.Optimizer):
    """A SAM-style wrapper: its param_groups are the inner optimizer's."""

    def __init__(self, params, base_cls, **kw):
        super().__init__(params, dict(kw))
        self.base_optimizer = base_cls(self.param_groups, **kw)
        self.param_groups = self.base_optimizer.param_groups

    def step(self, closure=None):
        return self.base_optimizer.step(closure)


class Wrapper:
    """An object that only exposes an inner optimizer (like accelerate's AcceleratedOptimizer)."""

    def __init__(self, opt):
        self.optimizer = opt


@pytest.mark.parametrize("make", [
    lambda g: torch.optim.SGD(g, lr=0.1, momentum=0.9),
    lambda g: torch.optim.Adam(g, lr=0.1),
    lambda g: torch.optim.AdamW(g, lr=0.1),
    lambda g: torch.optim.Adagrad(g, lr=0.1),
    lambda g: SAMLike(g, torch.optim.SGD, lr=0.1),
    lambda g: Wrapper(torch.optim.SGD(g, lr=0.1)),
], ids=["sgd", "adam", "adamw", "adagrad", "sam", "wrapper"])
def test_any_optimizer(make):
    model = cnn()
    table = OracleTable(model)
    tb = TempBalance(model, metrics_fn=lambda n: table)
    groups, count = tb.build_optimizer_param_group(0.1)
    opt = make(groups)
    tb.step(opt, 0.02)
    ref, _ = reference_groups(model, table, 0.02)
    inner = opt.optimizer if isinstance(opt, Wrapper) else opt
    assert [g["lr"] for g in inner.param_groups] == pytest.approx([lr for _, lr in ref], rel=1e-9)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    inner.step()


def test_scheduler_never_changes_model():
    model = cnn()
    model.train()
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    before = copy.deepcopy(model.state_dict())
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    tb = TempBalance(model)
    groups, _ = tb.build_optimizer_param_group(0.1)
    tb.step(torch.optim.SGD(groups, lr=0.1), 0.1)
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, grads[n]) and p.requires_grad


def _train(model, opt, tb, epochs, seed0):
    for epoch in range(epochs):
        g = torch.Generator().manual_seed(seed0 + epoch)
        for _ in range(2):
            x = torch.randn(4, 3, 8, 8, generator=g)
            y = torch.randint(0, 10, (4,), generator=g)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        tb.step(opt, 0.05 * 0.9 ** (seed0 + epoch))


def test_resume_schedules_like_uninterrupted(tmp_path):
    kw = dict(assign_func="tb_sigmoid", s=0.5, start_step=1)
    model = cnn()
    tb = Tempbalance(model, **kw)
    groups, _ = tb.build_optimizer_param_group(0.05)
    opt = torch.optim.SGD(groups, lr=0.05, momentum=0.9)
    _train(model, opt, tb, 2, 0)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "tb": tb.state_dict()}, tmp_path / "ck.pt")
    _train(model, opt, tb, 2, 2)

    ck = torch.load(tmp_path / "ck.pt")
    model2 = SmallCNN()
    model2.load_state_dict(ck["model"])
    tb2 = Tempbalance(model2, **kw)
    groups2, _ = tb2.build_optimizer_param_group(0.05)
    opt2 = torch.optim.SGD(groups2, lr=0.05, momentum=0.9)
    opt2.load_state_dict(ck["opt"])
    tb2.load_state_dict(ck["tb"])
    _train(model2, opt2, tb2, 2, 2)

    assert tb2.step_count == tb.step_count == 4
    assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]
    for k, v in model.state_dict().items():
        assert torch.equal(v, model2.state_dict()[k]), k


# ----------------------------------------------------------------------------- bad input
def test_bad_arguments():
    model = cnn()
    with pytest.raises(ValueError, match="unknown assign_func"):
        TempBalance(model, assign_func="tb_cubic")
    with pytest.raises(ValueError, match="lr_min_ratio"):
        TempBalance(model, lr_min_ratio=-0.5)
    with pytest.raises(ValueError, match="lr_max_ratio"):
        TempBalance(model, lr_max_ratio=-1)
    with pytest.raises(ValueError, match="pl_fitting"):
        TempBalance(model, pl_fitting="mle")
    with pytest.raises(ValueError, match="batchnorm_type"):
        TempBalance(model, batchnorm_type="position")
    with pytest.raises(ValueError, match="esd_metric_for_tb"):
        TempBalance(model, esd_metric_for_tb="alpha_hat")
    with pytest.raises(ValueError, match="granularity"):
        TempBalance(model, granularity="head")
    with pytest.raises(ValueError, match="s must be"):
        TempBalance(model, assign_func="tb_sigmoid", s=(1.0, -1.0))


def test_mismatched_optimizer_groups():
    model = cnn()
    table = OracleTable(model)
    tb = TempBalance(model, metrics_fn=lambda n: table)
    tb.build_optimizer_param_group(0.1)
    with pytest.raises(ValueError, match="param group 0 mixes"):
        tb.step(torch.optim.SGD(model.parameters(), lr=0.1), 0.1)
    stranger = nn.Linear(3, 3)
    with pytest.raises(ValueError, match="not a parameter of the model"):
        tb.step(torch.optim.SGD(stranger.parameters(), lr=0.1), 0.1)


def test_unfittable_layer_is_named():
    model = cnn()
    table = OracleTable(model)
    table.status[2] = "all eigenvalues are zero"
    tb = TempBalance(model, metrics_fn=lambda n: table)
    with pytest.raises(ValueError, match="layer 'stage.0'.*all eigenvalues are zero"):
        tb.build_optimizer_param_group(0.1)
    table.status[2] = "ok"
    table.cols["alpha"][3] = float("nan")
    with pytest.raises(ValueError, match="layer 'conv3'"):
        tb.build_optimizer_param_group(0.1)


def test_exported_names():
    assert tbfast.TempBalance is TempBalance and tbfast.Tempbalance is TempBalance
