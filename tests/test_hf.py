"""tbfast.integrations.hf with a real transformers Trainer on tiny random BERT / RoBERTa (CPU, no download).

Each step, a recorder callback checks every optimizer group's lr against
``scheduler lr * 10 ** (s * (sigmoid(tau * (block alpha - mean)) - 0.5))`` with block alphas from an
fp64 SVD oracle and the SPEC median-fit formula, computed here independently of tbfast.
"""
import math
import re

import numpy as np
import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import tbfast  # noqa: E402
from tbfast.integrations import hf  # noqa: E402


def _trainer_resume_refused() -> str | None:
    """Why this transformers cannot resume a Trainer checkpoint on this torch, or None: recent
    releases (4.57.6 here) refuse ``torch.load`` (optimizer/RNG states) on torch < 2.6
    (CVE-2025-32434)."""
    check = getattr(getattr(transformers.utils, "import_utils", None), "check_torch_load_is_safe", None)
    if check is None:
        return None
    try:
        check()
    except ValueError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return f"transformers {transformers.__version__} refuses Trainer resume on torch {torch.__version__}: {first}"
    return None


needs_trainer_resume = pytest.mark.skipif(_trainer_resume_refused() is not None,
                                          reason=str(_trainer_resume_refused()))

TAU, S = 10.0, (2.0, 1.0)


def oracle_block_alphas(model, xmin_pos=1.5):
    per_block = {}
    for name, m in model.named_modules():
        if not isinstance(m, nn.Linear):
            continue
        mt = re.match(r"(.*?)\.(\d+)\.(.*)", name)
        if mt is None:
            continue
        e = np.sort((torch.linalg.svdvals(m.weight.detach().double()) ** 2).numpy())
        N = len(e)
        i = int(N / xmin_pos)
        n = N - i
        alpha = 1 + n / (np.sum(np.log(e[i:])) - n * np.log(e[i]))
        per_block.setdefault(int(mt.group(2)), []).append(alpha)
    return {b: float(np.mean(v)) for b, v in per_block.items()}


def sigmoid_factors(block_alpha):
    mean = sum(block_alpha.values()) / len(block_alpha)
    out = {}
    for b, a in block_alpha.items():
        d = a - mean
        s = S[0] if d <= 0 else S[1]
        out[b] = 10 ** (s * (1 / (1 + math.exp(-TAU * d)) - 0.5))
    return out


class Recorder(transformers.TrainerCallback):
    def __init__(self, model):
        self.model = model
        self.checked = 0
        self.factors_seen = []

    def on_step_end(self, args, state, control, optimizer=None, lr_scheduler=None, **kw):
        factors = sigmoid_factors(oracle_block_alphas(self.model))
        names = {id(p): n for n, p in self.model.named_parameters()}
        sched = lr_scheduler.get_last_lr()
        for gi, g in enumerate(optimizer.param_groups):
            blocks = {re.match(r"(.*?)\.(\d+)\.(.*)", names[id(p)]) for p in g["params"]}
            blocks = {int(m.group(2)) if m else None for m in blocks}
            assert len(blocks) == 1, f"group {gi} spans blocks {blocks}"
            b = blocks.pop()
            want = sched[gi] * (factors[b] if b is not None else 1.0)
            assert math.isclose(g["lr"], want, rel_tol=1e-3), (state.global_step, gi, g["lr"], want)
            # the Trainer's decay / no-decay split is kept
            nd = [("bias" in names[id(p)] or "LayerNorm" in names[id(p)]) for p in g["params"]]
            assert all(nd) if g["weight_decay"] == 0.0 else not any(nd), gi
        self.factors_seen.append(factors)
        self.checked += 1


def tiny(kind):
    torch.manual_seed(0)
    common = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=64, num_labels=2)
    if kind == "bert":
        cfg = transformers.BertConfig(max_position_embeddings=64, **common)
        return transformers.BertForSequenceClassification(cfg)
    cfg = transformers.RobertaConfig(max_position_embeddings=66, pad_token_id=1, **common)
    return transformers.RobertaForSequenceClassification(cfg)


class ToyData(torch.utils.data.Dataset):
    def __init__(self, n=16, seq=12):
        g = torch.Generator().manual_seed(1)
        self.x = torch.randint(3, 100, (n, seq), generator=g)
        self.y = (self.x[:, 0] > 50).long()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "attention_mask": torch.ones_like(self.x[i]), "labels": self.y[i]}


def make_trainer(model, tmp_path, steps=5, warmup=0, n=16):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=steps, learning_rate=1e-3,
        weight_decay=0.01, warmup_steps=warmup, lr_scheduler_type="linear", logging_steps=1,
        report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
    )
    return transformers.Trainer(model=model, args=args, train_dataset=ToyData(n))


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_trainer_block_sigmoid(kind, tmp_path):
    model = tiny(kind)
    tb = tbfast.TempBalance(model, assign_func="tb_sigmoid", tau=TAU, s=S, granularity="block", xmin_pos=1.5,
                            remove_first_layer=False, eigs_thresh=10, dtype=torch.float64)
    trainer = make_trainer(model, tmp_path)
    cb = hf.attach(trainer, tb)
    rec = Recorder(model)
    trainer.add_callback(rec)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    assert rec.checked == 5
    assert cb.interval == 1 and cb.esd_steps == [0, 1, 2, 3, 4, 5]  # 4 steps/epoch // 10 -> every step
    # balanced: the two blocks really get different lrs, and training moved the weights
    assert all(abs(f[0] - f[1]) > 1e-3 for f in rec.factors_seen)
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    # per-layer table went through Trainer.log
    logged = [h for h in trainer.state.log_history if any(k.startswith("tempbalance/alpha/") for k in h)]
    assert len(logged) == 6
    assert "tempbalance/lr_factor/block.1" in logged[-1]
    first = "bert" if kind == "bert" else "roberta"
    assert f"tempbalance/alpha/{first}.encoder.layer.0.attention.self.query" in logged[-1]


def test_esd_interval_rule_and_warmup(tmp_path):
    assert hf.esd_interval_for(100) == 10
    assert hf.esd_interval_for(100, 3) == 3
    assert hf.esd_interval_for(5, 50) == 1
    model = tiny("bert")
    tb = tbfast.TempBalance(model, assign_func="tb_sigmoid", s=S, granularity="block", xmin_pos=1.5,
                            remove_first_layer=False, eigs_thresh=10)
    # 80 samples / batch 4 = 20 steps per epoch -> interval min(None rule 2) = 2
    trainer = make_trainer(model, tmp_path, steps=7, warmup=3, n=80)
    cb = hf.attach(trainer, tb, start_after_warmup=True)
    lrs = []

    class Spy(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, lr_scheduler=None, **kw):
            lrs.append((state.global_step, [g["lr"] for g in optimizer.param_groups], lr_scheduler.get_last_lr()))

    trainer.add_callback(Spy())
    trainer.train()
    assert cb.interval == 2
    assert cb.esd_steps == [3, 4, 6]  # first after warm-up, then every 2 steps
    for step, group_lrs, sched in lrs:
        if step < 3:
            assert group_lrs == sched  # untuned during warm-up
        elif max(sched) > 0:  # the linear schedule ends at 0
            assert len({round(a / b, 12) for a, b in zip(group_lrs, sched) if b > 0}) > 1


def test_attach_refuses_existing_optimizer(tmp_path):
    model = tiny("bert")
    tb = tbfast.TempBalance(model, eigs_thresh=10, granularity="block")
    trainer = make_trainer(model, tmp_path)
    trainer.optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="already has an optimizer"):
        hf.attach(trainer, tb)


def test_trainer_asynchronous_esd(tmp_path):
    model = tiny("bert")
    opts = dict(assign_func="tb_sigmoid", tau=TAU, s=S, granularity="block", xmin_pos=1.5,
                remove_first_layer=False, eigs_thresh=10)
    tb = tbfast.TempBalance(model, asynchronous=True, **opts)
    trainer = make_trainer(model, tmp_path, steps=4)
    cb = hf.attach(trainer, tb)
    trainer.train()
    assert cb.esd_steps == [0, 1, 2, 3, 4]
    # async_lag=1: the ESD of step 3 is in use after step 4 (it was 0 <= lag <= 4 before the lag rule)
    assert tb.schedule_step == 3 and tb.lag == 1
    tb.synchronize()
    # the last snapshot holds the final weights: its ESD equals a synchronous one on them
    assert tb.schedule_step == 4
    oracle = tbfast.TempBalance(model, **opts)
    oracle.update()
    assert tb.ratios == oracle.ratios
    tb.close()
def test_asynchronous_trainer_exports_the_state_only_for_checkpoints(tmp_path, monkeypatch):
    """tb.state_dict() waits for an ESD in flight, so the callback calls it only when the Trainer is
    about to save (save_steps=3 of 6 steps: at train begin, and steps 3 and 6), not at every step."""
    model = tiny("bert")
    tb = tbfast.TempBalance(model, asynchronous=True, granularity="block", eigs_thresh=10, remove_first_layer=False)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=6, learning_rate=1e-3,
        lr_scheduler_type="linear", logging_steps=100, report_to=[], save_strategy="steps", save_steps=3,
        use_cpu=True, disable_tqdm=True, seed=0,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=ToyData(24))
    hf.attach(trainer, tb)
    calls = []
    real = tb.state_dict
    monkeypatch.setattr(tb, "state_dict", lambda: (calls.append(trainer.state.global_step), real())[1])
    trainer.train()
    tb.close()
    assert calls == [0, 3, 6]
    import json
    saved = json.loads((tmp_path / "checkpoint-6" / "trainer_state.json").read_text())
    assert saved["stateful_callbacks"][hf.STATE_KEY]["global_step"] == 6


@needs_trainer_resume
def test_resume_restores_schedule_between_esds(tmp_path):
    """esd_interval=4, checkpoint at step 6: the resumed run must not recompute the ESD at step 6.

    Oracle: the same run without interruption. lrs at every step and the final weights must be
    bitwise equal (CPU).
    """
    def run(out, resume=None):
        model = tiny("bert")
        tb = tbfast.TempBalance(model, assign_func="tb_sigmoid", tau=TAU, s=S, granularity="block", xmin_pos=1.5,
                                remove_first_layer=False, eigs_thresh=10, dtype=torch.float64)
        args = transformers.TrainingArguments(
            output_dir=str(out), per_device_train_batch_size=4, max_steps=10, learning_rate=1e-3,
            weight_decay=0.01, lr_scheduler_type="linear", logging_steps=100, report_to=[],
            save_strategy="steps", save_steps=6, use_cpu=True, disable_tqdm=True, seed=0,
        )
        # 160 samples / batch 4 = 40 steps per epoch: the interval rule allows esd_interval=4
        trainer = transformers.Trainer(model=model, args=args, train_dataset=ToyData(160))
        cb = hf.attach(trainer, tb, esd_interval=4, log_table=False)
        lrs = {}

        class Spy(transformers.TrainerCallback):
            def on_step_end(self, args, state, control, optimizer=None, **kw):
                lrs[state.global_step] = [g["lr"] for g in optimizer.param_groups]

        trainer.add_callback(Spy())
        trainer.train(resume_from_checkpoint=resume)
        return lrs, {n: p.detach().clone() for n, p in model.named_parameters()}, cb

    full_lrs, full_w, full_cb = run(tmp_path / "full")
    assert full_cb.interval == 4 and full_cb.esd_steps == [0, 4, 8]
    ckpt = tmp_path / "full" / "checkpoint-6"
    assert ckpt.is_dir()
    res_lrs, res_w, res_cb = run(tmp_path / "resumed", resume=str(ckpt))
    assert sorted(res_lrs) == [7, 8, 9, 10]
    for step in res_lrs:
        assert res_lrs[step] == full_lrs[step], step
    assert res_cb.esd_steps == [0, 4, 8]  # restored history, then the ESD at step 8 only
    # the two blocks are balanced differently, so a recomputed ESD would show up in the lrs
    assert len({round(a / full_lrs[7][-1], 9) for a in full_lrs[7] if full_lrs[7][-1] > 0}) > 1
    for n, w in full_w.items():
        assert torch.equal(res_w[n], w), n


@needs_trainer_resume
def test_resume_refuses_a_foreign_or_broken_tempbalance_state(tmp_path):
    """trainer_state.json holding another model's TempBalance state, or NaN factors: a ValueError
    naming the file and key before training resumes (the optimizer's lrs are not written)."""
    import json

    def trainer_for(out, steps):
        model = tiny("bert")
        tb = tbfast.TempBalance(model, eigs_thresh=10, remove_first_layer=False)
        args = transformers.TrainingArguments(
            output_dir=str(out), per_device_train_batch_size=4, max_steps=steps, learning_rate=1e-3,
            lr_scheduler_type="linear", report_to=[], save_strategy="steps", save_steps=2, use_cpu=True,
            disable_tqdm=True, seed=0)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=ToyData(16))
        hf.attach(trainer, tb, esd_interval=2, log_table=False)
        return trainer

    trainer_for(tmp_path / "run", 2).train()
    ckpt = tmp_path / "run" / "checkpoint-2"
    path = ckpt / "trainer_state.json"
    saved = json.loads(path.read_text())
    entry = saved["stateful_callbacks"][hf.STATE_KEY]

    other = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))
    foreign = tbfast.TempBalance(other, eigs_thresh=10, remove_first_layer=False)
    foreign.build_optimizer_param_group(1e-3)
    foreign.step_count = 2
    nan_state = json.loads(entry["tempbalance"])
    first = next(iter(nan_state["ratios"]))
    nan_state["ratios"][first] = float("nan")
    for bad, match in ((foreign.state_dict(), r"trainer_state.json, key stateful_callbacks\['tbfast.TempBalance'\]"
                        r"\['tempbalance'\]: TempBalance state does not match this model \(first differing layer"),
                       (nan_state, r"trainer_state.json.*ratios\['" + re.escape(first) + r"'\] is nan")):
        entry["tempbalance"] = json.dumps(bad)
        path.write_text(json.dumps(saved))
        trainer = trainer_for(tmp_path / "resumed", 4)
        with pytest.raises(ValueError, match=match):
            trainer.train(resume_from_checkpoint=str(ckpt))
