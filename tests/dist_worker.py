"""Scenarios run on every rank of a 2-process gloo group by tests/test_distributed.py.

Each scenario writes what this rank saw (lrs as float hex, tables, stats) to JSON under the
output directory; the test compares the ranks with each other and with single-process runs.
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

STEPS = 3
LR = 0.1


def tiny_model(seed: int = 0) -> nn.Module:
    """Five Linear layers (first and last are left out by TempBalance), each >= 50 eigenvalues."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(24, 64), nn.ReLU(), nn.Linear(64, 72), nn.ReLU(), nn.Linear(72, 56),
                         nn.ReLU(), nn.Linear(56, 60), nn.ReLU(), nn.Linear(60, 4))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(32, 24, generator=g), torch.randn(32, 4, generator=g)


def train_with_tempbalance(model: nn.Module, **tb_options) -> tuple[list[list[float]], object]:
    """3 x (two SGD steps on a fixed batch, then TempBalance.step); the lrs written each time."""
    import tbfast

    tb = tbfast.TempBalance(model, **tb_options)
    groups, _ = tb.build_optimizer_param_group(untuned_lr=LR)
    opt = torch.optim.SGD(groups, lr=LR, momentum=0.9)
    history = []
    for step in range(STEPS):
        for it in range(2):
            x, y = batch(10 * step + it)
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        history.append([float(v) for v in tb.step(opt, LR)])
    return history, tb


def _dump(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f)


def _hf_trainer(rank: int, world: int, out: str):
    """A 2-process (DDP) Hugging Face Trainer with the TempBalance callback; test_hf's Recorder
    checks every group's lr against an fp64 SVD oracle at every step, on every rank."""
    try:
        import test_hf
    except Exception:  # transformers not installed  # noqa: BLE001
        return None
    import pathlib

    import tbfast
    from tbfast.integrations import hf

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    model = test_hf.tiny("bert")
    tb = tbfast.TempBalance(model, assign_func="tb_sigmoid", tau=test_hf.TAU, s=test_hf.S, granularity="block",
                            xmin_pos=1.5, remove_first_layer=False, eigs_thresh=10, dtype=torch.float64,
                            process_group=dist.group.WORLD)  # DDP: the split is asked for explicitly
    trainer = test_hf.make_trainer(model, pathlib.Path(out) / f"hf{rank}", steps=3)
    hf.attach(trainer, tb)
    rec = test_hf.Recorder(model)
    trainer.add_callback(rec)
    trainer.train()
    return {"world_size": trainer.args.world_size, "checked": rec.checked,
            "wrapped": type(trainer.model_wrapped).__name__,
            "owner": tb.metrics.extra["distributed"]["owner"],
            "lrs_hex": [float(g["lr"]).hex() for g in trainer.optimizer.param_groups]}


def _disagreeing_ranks(rank: int) -> dict:
    """Replicated weights that differ between the ranks, or NaN on the rank that does not own the
    layer: every rank must raise, naming the layer and the ranks."""
    import tbfast
    from tbfast.distributed import plan
    from tbfast.layers import find_layers

    res: dict = {}
    world = dist.group.WORLD

    def attempt(key, fn):
        try:
            fn()
            res[key] = None
        except Exception as e:  # noqa: BLE001 - the class and message are what is checked
            res[key] = f"{type(e).__name__}: {e}"

    model = tiny_model()
    with torch.no_grad():
        if rank == 1:
            model[4].weight[3, 5] += 1e-3  # rank 1's copy of layer "4" differs from rank 0's
    attempt("mismatch_analyze", lambda: tbfast.analyze(model, min_evals=0, process_group=world))
    attempt("mismatch_tempbalance", lambda: train_with_tempbalance(model, process_group=world))

    model = tiny_model()
    layers = find_layers(model, min_evals=0)
    owner = plan(layers, dist.get_world_size(world))
    victim = next(l.name for l, o in zip(layers, owner) if o == 0)  # a layer rank 0 analyses
    res["nan_layer"] = victim
    with torch.no_grad():
        if rank == 1:  # NaN only on the rank that does not analyse it
            dict(model.named_modules())[victim].weight[0, 0] = float("nan")
    attempt("nan_elsewhere", lambda: tbfast.analyze(model, min_evals=0, process_group=world))
    # the same weights everywhere still agree (and the check does not fire on equal replicas)
    attempt("agree", lambda: tbfast.analyze(tiny_model(), min_evals=0, process_group=world))
    return res


def solo(rank: int, world: int, port: int, out: str) -> None:
    """Rank 0 alone calls every entry point on ordinary (replicated) weights while rank 1 does
    nothing: none of the calls may wait for rank 1 (process_group=None)."""
    import time

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    done = os.path.join(out, "solo_done")
    ddp = nn.parallel.DistributedDataParallel(tiny_model())  # a collective, on both ranks
    if rank == 0:
        import tbfast

        res = {"alpha_esd": tbfast.layer_metrics(ddp, min_evals=0).alpha.tolist()}
        sp = tbfast.esd(ddp, min_evals=0)
        res["esd_layers"] = len(sp)
        a = tbfast.analyze(ddp, min_evals=0)
        res["analyze_alpha"] = list(a["alpha"])
        from tbfast.analyze import analyze_spectra

        res["analyze_split"] = "distributed" in analyze_spectra(ddp, min_evals=0).metrics.extra
        hist, tb = train_with_tempbalance(ddp.module)  # TempBalance(process_group=None).step
        res["tb_lrs"] = hist
        res["tb_split"] = "distributed" in tb.metrics.extra
        _dump(os.path.join(out, "solo0.json"), res)
        open(done, "w").close()
    else:
        deadline = time.monotonic() + 600
        while not os.path.exists(done) and time.monotonic() < deadline:
            time.sleep(0.1)
    dist.destroy_process_group()


def run(rank: int, world: int, port: int, out: str, ckpt: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    import tbfast
    from tbfast.layers import Layer

    res: dict = {}
    # DDP: the split over the ranks is asked for with process_group (None: each rank alone)
    ddp = nn.parallel.DistributedDataParallel(tiny_model())
    hist, tb = train_with_tempbalance(ddp, process_group=dist.group.WORLD)
    res["ddp_lrs"] = hist
    res["ddp_lrs_hex"] = [[v.hex() for v in h] for h in hist]
    res["ddp_alpha"] = tb.metrics.alpha.tolist()
    res["ddp_owner"] = tb.metrics.extra["distributed"]["owner"]
    res["ddp_loaded"] = tb.metrics.extra["distributed"]["loaded"]
    ddp = nn.parallel.DistributedDataParallel(tiny_model())
    hist, tb = train_with_tempbalance(ddp)  # process_group=None with replicated weights: no collective
    res["ddp_default_lrs_hex"] = [[v.hex() for v in h] for h in hist]
    res["ddp_default_split"] = "distributed" in tb.metrics.extra

    # FSDP2: the public torch.distributed.fsdp.fully_shard is torch >= 2.6 (tests skip without it)
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        fully_shard = None
    if fully_shard is not None:

        model = tiny_model()
        for m in model:
            if isinstance(m, nn.Linear):
                fully_shard(m)
        fully_shard(model)
        from torch.distributed.tensor import DTensor

        calls = []
        full_tensor = DTensor.full_tensor
        DTensor.full_tensor = lambda self, *a, **k: calls.append(tuple(self.shape)) or full_tensor(self, *a, **k)
        try:
            hist, tb = train_with_tempbalance(model)
        finally:
            DTensor.full_tensor = full_tensor
        st = tb.metrics.extra["distributed"]
        res["fsdp_full_tensor_calls"] = len(calls)  # no rank all-gathers a whole weight (FSDP2 layout)
        res["fsdp_lrs"] = hist
        res["fsdp_lrs_hex"] = [[v.hex() for v in h] for h in hist]
        res["fsdp_names"] = list(tb.metrics.names)
        res["fsdp_owner"] = st["owner"]
        res["fsdp_materialized"] = st["materialized"]
        res["fsdp_materialized_bytes"] = st["materialized_bytes"]
        res["fsdp_local_param_bytes"] = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
        res["fsdp_state_keys"] = sorted(tb.state_dict())
        # optimizer state_dict round trip on sharded parameters
        opt_groups = [{"params": g["params"], "lr": g["lr"]} for g in tb.build_optimizer_param_group(LR)[0]]
        opt = torch.optim.SGD(opt_groups, lr=LR)
        tb.step(opt, LR)
        sd = opt.state_dict()
        opt2 = torch.optim.SGD([{"params": g["params"], "lr": 1.0} for g in opt_groups], lr=1.0)
        opt2.load_state_dict(sd)
        res["fsdp_resume_lrs"] = [g["lr"] for g in opt2.param_groups]
        res["fsdp_resume_applied"] = tb.apply(opt2)

    # FSDP1 with use_orig_params=True, one unit per Linear
    import warnings

    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FSDP1 deprecation notice
        model = FSDP(tiny_model(), use_orig_params=True, device_id=torch.device("cpu"),
                     auto_wrap_policy=ModuleWrapPolicy({nn.Linear}))
        hist, tb = train_with_tempbalance(model)
    res["fsdp1_lrs"] = hist
    res["fsdp1_lrs_hex"] = [[v.hex() for v in h] for h in hist]

    # analyze a checkpoint: every rank gets the table, reading only its tensors
    everyone = dist.group.WORLD
    a = tbfast.analyze(ckpt, min_evals=0, process_group=everyone)
    res["analyze"] = a.to_dict(orient="list")
    from tbfast.analyze import analyze_spectra

    s = analyze_spectra(ckpt, min_evals=0, process_group=everyone)
    res["analyze_loaded"] = s.metrics.extra["distributed"]["loaded"]
    res["analyze_owner"] = s.metrics.extra["distributed"]["owner"]
    res["analyze_values_hex"] = [float(v).hex() for v in s.spectra.values.double()]

    # an explicit group (here a new group of both ranks), and process_group=False (no split)
    sub = dist.new_group([0, 1])
    res["analyze_subgroup"] = tbfast.analyze(ckpt, min_evals=0, process_group=sub).to_dict(orient="list")
    alone = analyze_spectra(ckpt, min_evals=0, process_group=False)
    res["analyze_alone_split"] = "distributed" in alone.metrics.extra
    res["analyze_alone"] = alone.details.to_dict(orient="list")
    default = analyze_spectra(ckpt, min_evals=0)  # None: this rank alone (no implicit collective)
    res["analyze_default_split"] = "distributed" in default.metrics.extra
    res["analyze_default"] = default.details.to_dict(orient="list")

    # an error on the rank that owns a layer reaches every rank
    def bad():
        raise ValueError("layer 'b': cannot read its tensor")

    layers = [Layer(name=n, kind="matrix", shape=(30, 20), rows=30, cols=20,
                    loader=(bad if n == "b" else (lambda: torch.randn(1, 30, 20)))) for n in ("a", "b", "c")]
    try:
        tbfast.analyze(layers, min_evals=0, process_group=everyone)
        res["error"] = None
    except ValueError as e:
        res["error"] = str(e)
    from tbfast.checkpoint import CorruptCheckpointError

    def corrupt():
        raise CorruptCheckpointError("f.safetensors: tensor 'b' is truncated")

    layers[1] = Layer(name="b", kind="matrix", shape=(30, 20), rows=30, cols=20, loader=corrupt)
    try:
        tbfast.analyze(layers, min_evals=0, process_group=everyone)
        res["error_class"] = None
    except Exception as e:  # noqa: BLE001 - the class is what is checked
        res["error_class"] = type(e).__name__
    res.update(_disagreeing_ranks(rank))
    res["hf"] = _hf_trainer(rank, world, out)
    _dump(os.path.join(out, f"rank{rank}.json"), res)
    dist.destroy_process_group()


if __name__ == "__main__":  # pragma: no cover - manual run / test_distributed's solo scenario
    if sys.argv[1] == "solo":
        solo(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
    else:
        run(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
