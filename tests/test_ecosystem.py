"""polyak inside torch's ecosystem: LR schedulers, AMP, grad clipping, SWA, DDP, global hooks.

Every test trains a polyak optimizer and its torch.optim twin side by side, from identical
weights on identical data, and compares what comes out. On the default CPU path the numbers
must be bit-identical.
"""

from __future__ import annotations

import copy
import os
import socket
import time
import warnings
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as torch_mp
import torch.nn.functional as F
from conftest import params_for
from registry import REGISTRY, Entry, ids
from torch import nn
from torch.optim import lr_scheduler as lrs
from torch.optim import optimizer as torch_optimizer
from torch.optim import swa_utils

import polyak

SGDFactory = Callable[..., torch.optim.Optimizer]
OPTIMIZERS: list[tuple[str, SGDFactory]] = [("polyak", polyak.SGD), ("torch", torch.optim.SGD)]


# ------------------------------------------------------------------------------------ helpers


class _Lookup(nn.Module):
    """A table of rows picked by the first input feature: its gradients are sparse."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(12, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = (x[:, 0].abs() * 4).long().clamp(max=11)
        return F.embedding(rows, self.weight, sparse=True)


def make_model(seed: int = 0, sparse: bool = False, matrices: bool = False) -> nn.Sequential:
    """A small MLP; ``matrices``: without biases, for optimizers of 2-D parameters only."""
    torch.manual_seed(seed)
    if sparse:
        return nn.Sequential(_Lookup())
    return nn.Sequential(
        nn.Linear(5, 8, bias=not matrices), nn.Tanh(), nn.Linear(8, 2, bias=not matrices)
    )


def make_batches(n: int, seed: int = 1, batch: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch, 5, generator=gen), torch.randn(batch, 2, generator=gen))
        for _ in range(n)
    ]


def param_groups(model: nn.Sequential, lr: float | torch.Tensor) -> list[dict[str, Any]]:
    """Two groups with different learning rates, so per-group schedules are exercised."""
    lr2 = lr.clone() / 2 if isinstance(lr, torch.Tensor) else lr / 2
    return [
        {"params": list(model[0].parameters())},
        {"params": list(model[2].parameters()), "lr": lr2},
    ]


def params_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def assert_params_equal(a: nn.Module | list[torch.Tensor], b: nn.Module | list[torch.Tensor]):
    pa = params_of(a) if isinstance(a, nn.Module) else a
    pb = params_of(b) if isinstance(b, nn.Module) else b
    assert len(pa) == len(pb)
    for i, (x, y) in enumerate(zip(pa, pb, strict=True)):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert torch.equal(x, y), f"param {i} differs by {(x - y).abs().max().item()}"


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor):
    opt.zero_grad()
    loss = F.mse_loss(model(x), y)
    loss.backward()
    opt.step()
    return loss.detach()


def hyper_snapshot(opt: torch.optim.Optimizer) -> list[tuple[float, float]]:
    """Each group's (lr, momentum) as Python floats, for exact comparison."""
    return [(float(g["lr"]), float(g["momentum"])) for g in opt.param_groups]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------------- 1. LR schedulers

SchedFactory = Callable[[torch.optim.Optimizer], Any]

SCHEDULERS: dict[str, SchedFactory] = {
    "LambdaLR": lambda o: lrs.LambdaLR(o, lr_lambda=[lambda e: 0.9**e, lambda e: 1 / (1 + e)]),
    "MultiplicativeLR": lambda o: lrs.MultiplicativeLR(o, lr_lambda=lambda e: 0.95),
    "StepLR": lambda o: lrs.StepLR(o, step_size=4, gamma=0.5),
    "MultiStepLR": lambda o: lrs.MultiStepLR(o, milestones=[3, 7, 11], gamma=0.3),
    "ConstantLR": lambda o: lrs.ConstantLR(o, factor=0.25, total_iters=6),
    "LinearLR": lambda o: lrs.LinearLR(o, start_factor=0.1, end_factor=1.0, total_iters=10),
    "ExponentialLR": lambda o: lrs.ExponentialLR(o, gamma=0.85),
    "PolynomialLR": lambda o: lrs.PolynomialLR(o, total_iters=12, power=2.0),
    "CosineAnnealingLR": lambda o: lrs.CosineAnnealingLR(o, T_max=10, eta_min=1e-3),
    "ChainedScheduler": lambda o: lrs.ChainedScheduler(
        [lrs.ConstantLR(o, factor=0.5, total_iters=5), lrs.ExponentialLR(o, gamma=0.9)]
    ),
    "SequentialLR": lambda o: lrs.SequentialLR(
        o,
        schedulers=[
            lrs.LinearLR(o, start_factor=0.1, total_iters=5),
            lrs.CosineAnnealingLR(o, T_max=10),
        ],
        milestones=[5],
    ),
    # threshold=0.5: an improvement under 50% is a plateau, so the lr does get reduced.
    "ReduceLROnPlateau": lambda o: lrs.ReduceLROnPlateau(
        o, mode="min", factor=0.5, patience=1, threshold=0.5
    ),
    "CyclicLR": lambda o: lrs.CyclicLR(
        o,
        base_lr=0.01,
        max_lr=0.1,
        step_size_up=4,
        mode="triangular2",
        cycle_momentum=True,
        base_momentum=0.8,
        max_momentum=0.95,
    ),
    "OneCycleLR": lambda o: lrs.OneCycleLR(o, max_lr=[0.2, 0.1], total_steps=20),
    "CosineAnnealingWarmRestarts": lambda o: lrs.CosineAnnealingWarmRestarts(
        o, T_0=4, T_mult=2, eta_min=1e-3
    ),
}

STEPS = 15
SPLIT = 7  # where the checkpoint tests save and restore


def scheduler_step(sched: Any, loss: torch.Tensor) -> None:
    if isinstance(sched, lrs.ReduceLROnPlateau):
        sched.step(loss.item())
    else:
        sched.step()


def run_scheduled(
    opt_cls: SGDFactory,
    make_sched: SchedFactory,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    lr: float | torch.Tensor = 0.1,
) -> tuple[nn.Sequential, list[Any], list[list[float]]]:
    model = make_model()
    opt = opt_cls(param_groups(model, lr), lr=lr, momentum=0.9, weight_decay=1e-3)
    sched = make_sched(opt)
    hypers: list[Any] = [hyper_snapshot(opt)]
    last_lrs: list[list[float]] = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for x, y in batches:
            loss = train_step(model, opt, x, y)
            scheduler_step(sched, loss)
            hypers.append(hyper_snapshot(opt))
            last_lrs.append([float(v) for v in sched.get_last_lr()])
    return model, hypers, last_lrs


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_scheduler_matches_torch(name: str) -> None:
    batches = make_batches(STEPS)
    model_p, hypers_p, last_p = run_scheduled(polyak.SGD, SCHEDULERS[name], batches)
    model_t, hypers_t, last_t = run_scheduled(torch.optim.SGD, SCHEDULERS[name], batches)

    assert hypers_p == hypers_t
    assert last_p == last_t
    # The schedule really moved the learning rate, so the comparison above means something.
    assert len({h[0][0] for h in hypers_t}) > 1
    assert_params_equal(model_p, model_t)
    assert not torch.equal(params_of(model_p)[0], params_of(make_model())[0])


@pytest.mark.parametrize("name", ["StepLR", "ExponentialLR", "CosineAnnealingLR", "OneCycleLR"])
def test_scheduler_with_tensor_lr_matches_torch(name: str) -> None:
    batches = make_batches(STEPS)
    model_p, hypers_p, last_p = run_scheduled(
        polyak.SGD, SCHEDULERS[name], batches, lr=torch.tensor(0.1)
    )
    model_t, hypers_t, last_t = run_scheduled(
        torch.optim.SGD, SCHEDULERS[name], batches, lr=torch.tensor(0.1)
    )
    assert hypers_p == hypers_t
    assert last_p == last_t
    assert len({h[0][0] for h in hypers_t}) > 1
    assert_params_equal(model_p, model_t)


@pytest.mark.parametrize("source", ["polyak", "torch"])
@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_scheduler_checkpoint_resume(name: str, source: str) -> None:
    """Save optimizer + scheduler state mid-way, restore into fresh objects, continue.

    The resumed polyak run must match an uninterrupted torch.optim run bit for bit. With
    ``source="torch"`` the first half runs on torch.optim and its state_dict is loaded into
    polyak, so checkpoints move across.
    """
    make_sched = SCHEDULERS[name]
    batches = make_batches(STEPS)
    model_ref, hypers_ref, _ = run_scheduled(torch.optim.SGD, make_sched, batches)

    first_cls = polyak.SGD if source == "polyak" else torch.optim.SGD
    model = make_model()
    opt = first_cls(param_groups(model, 0.1), lr=0.1, momentum=0.9, weight_decay=1e-3)
    sched = make_sched(opt)
    hypers = [hyper_snapshot(opt)]
    for x, y in batches[:SPLIT]:
        loss = train_step(model, opt, x, y)
        scheduler_step(sched, loss)
        hypers.append(hyper_snapshot(opt))
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    saved_sched = copy.deepcopy(sched.state_dict())
    del model, opt, sched

    model = make_model(seed=123)  # different weights: everything must come from the checkpoint
    model.load_state_dict(saved_model)
    opt = polyak.SGD(param_groups(model, 0.1), lr=0.1, momentum=0.9, weight_decay=1e-3)
    sched = make_sched(opt)
    opt.load_state_dict(saved_opt)
    sched.load_state_dict(saved_sched)
    assert hyper_snapshot(opt) == hypers[-1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for x, y in batches[SPLIT:]:
            loss = train_step(model, opt, x, y)
            scheduler_step(sched, loss)
            hypers.append(hyper_snapshot(opt))

    assert hypers == hypers_ref
    assert_params_equal(model, model_ref)


def test_scheduler_before_optimizer_step_still_warns() -> None:
    """The check the scheduler tests rely on is live: calling the scheduler first warns."""
    model = make_model()
    opt = polyak.SGD(model.parameters(), lr=0.1)
    sched = lrs.StepLR(opt, step_size=2)
    with pytest.warns(UserWarning, match=r"lr_scheduler\.step\(\)` before `optimizer\.step\(\)"):
        sched.step()


# ---------------------------------------------------------------------------- 2. GradScaler

INF_STEP = 4  # not the first step: the momentum buffers already exist when it is skipped


def run_amp(
    opt_cls: Any,
    fused: bool,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    hyper: dict[str, Any] | None = None,
    sparse: bool = False,
    matrices: bool = False,
) -> dict[str, Any]:
    model = make_model(sparse=sparse, matrices=matrices)
    kwargs: dict[str, Any] = dict(
        hyper or {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3}
    )
    if fused:
        kwargs["fused"] = True
    opt = opt_cls(model.parameters(), **kwargs)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=3)
    out: dict[str, Any] = {"scales": [], "params": [], "step_counts": []}
    for i, (x, y) in enumerate(batches):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.mse_loss(model(x).float(), y)
        scaler.scale(loss).backward()
        if i == INF_STEP:
            grad = model[0].weight.grad
            (grad._values() if grad.is_sparse else grad)[0, 0] = float("inf")
        scaler.step(opt)
        scaler.update()
        out["scales"].append(scaler.get_scale())
        out["params"].append(params_of(model))
        out["step_counts"].append(getattr(opt, "_step_count", None))
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")
    return out


@pytest.mark.parametrize("fused", [False, True], ids=["default", "fused"])
def test_grad_scaler_autocast(fused: bool) -> None:
    batches = make_batches(10)
    got = run_amp(polyak.SGD, fused, batches)
    ref = run_amp(torch.optim.SGD, fused, batches)

    assert got["scales"] == ref["scales"]
    # The injected inf backs the scale off; without infs it grows every 3 steps.
    assert got["scales"][INF_STEP] == got["scales"][INF_STEP - 1] / 2
    assert max(got["scales"]) > 2.0**12
    for step, (p_got, p_ref) in enumerate(zip(got["params"], ref["params"], strict=True)):
        if fused:
            for a, b in zip(p_got, p_ref, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=f"step {step}")
        else:
            assert_params_equal(p_got, p_ref)
    # The step with an inf gradient is skipped whole: params unchanged, step not counted.
    assert_params_equal(got["params"][INF_STEP], got["params"][INF_STEP - 1])
    assert_params_equal(ref["params"][INF_STEP], ref["params"][INF_STEP - 1])
    assert not torch.equal(got["params"][INF_STEP + 1][0], got["params"][INF_STEP][0])
    expected_counts = [i + 1 if i < INF_STEP else i for i in range(len(batches))]
    assert got["step_counts"] == expected_counts


def test_grad_scaler_fused_unscales_in_step() -> None:
    """A fused polyak.SGD takes the scaled gradients and unscales them itself."""
    model = make_model()
    opt = polyak.SGD(model.parameters(), lr=0.05, fused=True)
    assert getattr(opt, "_step_supports_amp_scaling", False)
    ref_model = make_model()
    ref_opt = polyak.SGD(ref_model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x, y = make_batches(1)[0]
    scaler.scale(F.mse_loss(model(x), y)).backward()
    scaler.step(opt)
    F.mse_loss(ref_model(x), y).backward()
    ref_opt.step()
    for a, b in zip(params_of(model), params_of(ref_model), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert not torch.equal(params_of(model)[0], params_of(make_model())[0])


def test_grad_scaler_fused_leaves_unscaled_grads_like_torch() -> None:
    """After ``scaler.step`` p.grad holds the unscaled gradient on every torch path."""
    x, y = make_batches(1)[0]
    grads = {}
    for name, cls in OPTIMIZERS:
        model = make_model()
        opt = cls(model.parameters(), lr=0.05, momentum=0.9, fused=True)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        scaler.scale(F.mse_loss(model(x), y)).backward()
        scaler.step(opt)
        grads[name] = [p.grad.clone() for p in model.parameters()]
    for a, b in zip(grads["polyak"], grads["torch"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------ 3. gradient clipping


def test_clip_grad_norm_before_step() -> None:
    batches = make_batches(12)
    results = {}
    for name, cls in OPTIMIZERS:
        model = make_model()
        opt = cls(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)
        norms = []
        for x, y in batches:
            opt.zero_grad()
            F.mse_loss(model(x), y).backward()
            norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.5))
            torch.nn.utils.clip_grad_value_(model.parameters(), clip_value=0.2)
            opt.step()
        results[name] = (model, norms)
    model_p, norms_p = results["polyak"]
    model_t, norms_t = results["torch"]
    assert_params_equal(norms_p, norms_t)
    assert any(n > 0.5 for n in norms_t)  # clipping did happen
    assert_params_equal(model_p, model_t)


# ---------------------------------------------------------------------------------- 4. SWA


def run_swa(opt_cls: SGDFactory, batches: list[tuple[torch.Tensor, torch.Tensor]]):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    swa_model = swa_utils.AveragedModel(model)
    ema_model = swa_utils.AveragedModel(
        model, multi_avg_fn=swa_utils.get_ema_multi_avg_fn(0.9), use_buffers=True
    )
    opt = opt_cls(model.parameters(), lr=0.1, momentum=0.9)
    sched = lrs.CosineAnnealingLR(opt, T_max=6)
    swa_sched = swa_utils.SWALR(opt, swa_lr=0.02, anneal_epochs=3, anneal_strategy="cos")
    lrs_seen = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for i, (x, y) in enumerate(batches):
            train_step(model, opt, x, y)
            if i >= 6:
                swa_model.update_parameters(model)
                swa_sched.step()
            else:
                sched.step()
            ema_model.update_parameters(model)
            lrs_seen.append(opt.param_groups[0]["lr"])
    swa_utils.update_bn([x for x, _ in batches], swa_model)
    return model, swa_model, ema_model, lrs_seen


def test_swa_averaged_model_and_swalr() -> None:
    batches = make_batches(15)
    model_p, swa_p, ema_p, lrs_p = run_swa(polyak.SGD, batches)
    model_t, swa_t, ema_t, lrs_t = run_swa(torch.optim.SGD, batches)
    assert lrs_p == lrs_t
    assert lrs_t[-1] == pytest.approx(0.02)
    assert_params_equal(model_p, model_t)
    assert_params_equal(swa_p, swa_t)
    assert_params_equal(ema_p, ema_t)
    assert int(swa_p.n_averaged) == int(swa_t.n_averaged) == 9
    for a, b in zip(swa_p.buffers(), swa_t.buffers(), strict=True):
        assert torch.equal(a, b)
    # The average is not the last iterate.
    assert not torch.equal(params_of(swa_p.module)[0], params_of(model_p)[0])


# ---------------------------------------------------------------------------------- 5. DDP


def _gloo_available() -> bool:
    if not dist.is_available():
        return False
    try:
        return bool(dist.is_gloo_available())
    except Exception:
        return False


DDP_STEPS = 8


def _ddp_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """One DDP rank: train polyak.SGD and torch.optim.SGD from the same weights."""
    from torch.nn.parallel import DistributedDataParallel

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=30))
    try:
        results: dict[str, Any] = {}
        for name, cls in OPTIMIZERS:
            model = make_model()
            ddp = DistributedDataParallel(model)
            opt = cls(ddp.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4)
            for x, y in make_batches(DDP_STEPS, seed=100 + rank, batch=8):
                train_step(ddp, opt, x, y)
            results[name] = params_of(model)
        flat = torch.cat([p.flatten() for p in results["polyak"]])
        gathered = [torch.empty_like(flat) for _ in range(world_size)]
        dist.all_gather(gathered, flat)
        results["gathered"] = gathered
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
        # Neither rank tears down its connections while the other may still use them.
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not _gloo_available(), reason="torch.distributed with gloo is unavailable")
def test_ddp_gloo_two_ranks(tmp_path: Path) -> None:
    world_size = 2
    ctx = torch_mp.spawn(
        _ddp_worker,
        args=(world_size, free_port(), str(tmp_path)),
        nprocs=world_size,
        join=False,
    )
    deadline = time.monotonic() + 60
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail("DDP workers did not finish within 60 s")
    finally:
        for proc in ctx.processes:
            if proc.is_alive():
                proc.terminate()

    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world_size)]
    for res in ranks:
        assert_params_equal(res["polyak"], res["torch"])
        assert_params_equal(res["gathered"], ranks[0]["gathered"])
    assert_params_equal(ranks[0]["polyak"], ranks[1]["polyak"])
    # The ranks saw different data: the allreduce made them agree, and training moved them.
    assert not torch.equal(ranks[0]["polyak"][0], params_of(make_model())[0])


# --------------------------------------------------------------------- 6. real training loop


def test_digits_mlp_converges() -> None:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.data / 16.0, digits.target, test_size=0.25, random_state=0, stratify=digits.target
    )
    x_train_t = torch.tensor(x_train, dtype=torch.float32)
    y_train_t = torch.tensor(y_train, dtype=torch.long)
    x_test_t = torch.tensor(x_test, dtype=torch.float32)
    y_test_t = torch.tensor(y_test, dtype=torch.long)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = polyak.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        perm = torch.randperm(len(x_train_t), generator=gen)
        for idx in perm.split(32):
            opt.zero_grad()
            F.cross_entropy(model(x_train_t[idx]), y_train_t[idx]).backward()
            opt.step()
    with torch.no_grad():
        accuracy = (model(x_test_t).argmax(1) == y_test_t).float().mean().item()
    assert accuracy > 0.9
    assert opt._step_count == 5 * len(perm.split(32))


# ----------------------------------------------------------------- 7. global optimizer hooks


def test_global_step_hooks_fire_for_polyak() -> None:
    model = make_model()
    opt = polyak.SGD(model.parameters(), lr=0.1)
    other_model = make_model()
    other = torch.optim.SGD(other_model.parameters(), lr=0.1)
    calls: list[tuple[str, Any, torch.Tensor]] = []

    def pre(o: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        calls.append(("pre", o, o.param_groups[0]["params"][0].detach().clone()))

    def post(o: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        calls.append(("post", o, o.param_groups[0]["params"][0].detach().clone()))

    x, y = make_batches(1)[0]
    pre_handle = torch_optimizer.register_optimizer_step_pre_hook(pre)
    post_handle = torch_optimizer.register_optimizer_step_post_hook(post)
    try:
        train_step(model, opt, x, y)
        train_step(other_model, other, x, y)
    finally:
        pre_handle.remove()
        post_handle.remove()
    kinds = [(kind, o) for kind, o, _ in calls]
    assert kinds == [("pre", opt), ("post", opt), ("pre", other), ("post", other)]
    # pre sees the weights before the update, post after it, as for torch.optim.
    assert not torch.equal(calls[0][2], calls[1][2])
    assert torch.equal(calls[1][2], model[0].weight.detach())
    assert torch.equal(calls[0][2], calls[2][2]) and torch.equal(calls[1][2], calls[3][2])

    calls.clear()
    train_step(model, opt, x, y)
    assert calls == []  # removed handles no longer fire


def test_global_pre_hook_can_replace_step_arguments() -> None:
    """A global pre-hook returning (args, kwargs) replaces what step() receives.

    The hook passes ``args`` through unchanged, so it works whatever ``args`` holds.
    """
    x, y = make_batches(1)[0]
    losses = {}
    for name, cls in OPTIMIZERS:
        model = make_model()
        opt = cls(model.parameters(), lr=0.1)

        def closure(model: nn.Module = model, opt: Any = opt) -> torch.Tensor:
            opt.zero_grad()
            loss = F.mse_loss(model(x), y)
            loss.backward()
            return loss

        def pre(o: Any, args: Any, kwargs: Any, closure: Any = closure) -> Any:
            return args, {**kwargs, "closure": closure}

        handle = torch_optimizer.register_optimizer_step_pre_hook(pre)
        try:
            losses[name] = (opt.step(), params_of(model))
        finally:
            handle.remove()
    assert isinstance(losses["polyak"][0], torch.Tensor)
    assert torch.equal(losses["polyak"][0], losses["torch"][0])
    assert_params_equal(losses["polyak"][1], losses["torch"][1])


def test_step_hooks_see_the_same_args_as_torch() -> None:
    x, y = make_batches(1)[0]
    seen: dict[str, list[tuple[str, tuple[Any, ...], dict[str, Any]]]] = {}
    for name, cls in OPTIMIZERS:
        model = make_model()
        opt = cls(model.parameters(), lr=0.1)
        record: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

        def pre(o: Any, args: Any, kwargs: Any, record: Any = record) -> None:
            record.append(("pre", tuple(a is o for a in args), dict(kwargs)))

        def post(o: Any, args: Any, kwargs: Any, record: Any = record) -> None:
            record.append(("post", tuple(a is o for a in args), dict(kwargs)))

        opt.register_step_pre_hook(pre)
        opt.register_step_post_hook(post)
        F.mse_loss(model(x), y).backward()
        opt.step()
        seen[name] = record
    # torch: [("pre", (True,), {}), ("post", (True,), {})]: args[0] is the optimizer.
    assert seen["polyak"] == seen["torch"]


# ------------------------------------------------------------------- every optimizer likewise


def _cycles_momentum(entry: Entry) -> bool:
    # OneCycleLR also cycles ``betas``, or ``momentum`` where the optimizer has one in use.
    return (
        "betas" in entry.stateful
        or "betas" in entry.cls(params_for(entry, [(1,)])).defaults
        or (entry.stateful.get("momentum", 0) > 0)
    )


@pytest.mark.parametrize("entry", REGISTRY, ids=ids)
def test_scheduler_clipping_and_checkpoint(entry: Entry, tmp_path: Path) -> None:
    """A OneCycle schedule, gradient clipping and a mid-run save/load through files, identical to
    torch bit for bit; torch.optim resumes from polyak's checkpoint files and vice versa."""
    batches = make_batches(12)
    cycle = _cycles_momentum(entry)

    def build(opt_cls: Any) -> tuple[nn.Sequential, Any, Any]:
        model = make_model(sparse=entry.sparse_grads, matrices=entry.matrices_only)
        opt = opt_cls(model.parameters(), **copy.deepcopy(entry.stateful))
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=0.05, total_steps=len(batches), cycle_momentum=cycle
        )
        return model, opt, sched

    def run(model: nn.Sequential, opt: Any, sched: Any, part: list[Any]) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for x, y in part:

                def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
                    opt.zero_grad()
                    loss = F.mse_loss(model(x), y)
                    loss.backward()
                    if not entry.sparse_grads:  # the norm of sparse gradients is not supported
                        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
                    return loss.detach()

                if entry.step_closure:
                    opt.step(closure)
                else:
                    closure()
                    opt.step()
                sched.step()

    mine, theirs = build(entry.cls), build(entry.reference)
    run(*mine, batches[:6])
    run(*theirs, batches[:6])
    for name, (model, opt, sched) in (("mine", mine), ("theirs", theirs)):
        torch.save(
            {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()},
            tmp_path / f"{name}.pt",
        )
    # Each resumes from the other's files.
    resumed = {}
    for name, opt_cls, source in (
        ("mine", entry.cls, "theirs"),
        ("theirs", entry.reference, "mine"),
    ):
        saved = torch.load(tmp_path / f"{source}.pt", weights_only=True)
        model, opt, sched = build(opt_cls)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        sched.load_state_dict(saved["sched"])
        run(model, opt, sched, batches[6:])
        resumed[name] = model
    run(*theirs, batches[6:])
    assert_params_equal(resumed["mine"], theirs[0])
    assert_params_equal(resumed["theirs"], theirs[0])


def _amp_cases() -> list[Any]:
    return [
        pytest.param(entry, fused, id=f"{ids(entry)}-{'fused' if fused else 'default'}")
        for entry in REGISTRY
        # GradScaler takes no closure, and unscales the gradients before the step.
        if not entry.step_closure
        for fused in ([False, True] if entry.fused else [False])
    ]


@pytest.mark.parametrize(("entry", "fused"), _amp_cases())
def test_grad_scaler(entry: Entry, fused: bool) -> None:
    batches = make_batches(8)
    kwargs = copy.deepcopy(entry.stateful)
    got = run_amp(entry.cls, fused, batches, kwargs, entry.sparse_grads, entry.matrices_only)
    ref = run_amp(entry.reference, fused, batches, kwargs, entry.sparse_grads, entry.matrices_only)
    got, ref = got["params"], ref["params"]
    for p_got, p_ref in zip(got, ref, strict=True):
        if fused:
            for a, b in zip(p_got, p_ref, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        else:
            assert_params_equal(p_got, p_ref)
    assert_params_equal(got[INF_STEP], got[INF_STEP - 1])
