"""ADOPT: Adam whose step is normalized by the second moment of the steps before."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor

from polyak import _checks, _ops
from polyak.algorithms import _common
from polyak.optimizer import Hyper, Optimizer, ParamsT, StateLists


def quarter_power(step: float) -> float:
    """The default clipping bound of ADOPT's normalized gradient: ``step ** 0.25``."""
    bound: float = step**0.25
    return bound


#: How a group records its optimizer's ``clip_lambda``: the rule polyak computes itself (a
#: string the flat kernel can select a program by), no clipping, or a function of the user's.
_DEFAULT_CLIP, _CUSTOM_CLIP = "step**0.25", "custom"


class ADOPT(Optimizer):
    """ADOPT: adaptive gradient method with the optimal convergence rate.

    For each parameter θ with gradient g at step t = 1, 2, ... (after a step t = 0 that only
    sets v_0 ← g_0^2):

    .. math::

        g_t ← ±∇f_t(θ_{t-1}) + λ θ_{t-1}

        θ_{t-1} ← (1 - γ λ_d) θ_{t-1}

        n_t ← clip(g_t / max(√v_{t-1}, ε), -c(t), c(t))

        m_t ← β_1 m_{t-1} + (1 - β_1) n_t

        θ_t ← θ_{t-1} - γ m_t

        v_t ← β_2 v_{t-1} + (1 - β_2) g_t^2

    where γ = ``lr``, (β_1, β_2) = ``betas``, ε = ``eps`` and c = ``clip_lambda`` (c(t) =
    t^{1/4} by default; None: no clipping); the gradient is negated (−) when ``maximize``.
    ``weight_decay`` is λ, added to the gradient, or, with ``decouple``, λ_d, applied to the
    parameters (and λ = 0). Complex parameters are updated as pairs of reals.

    Note:
        This is torch-adopt 0.1.0's ``ADOPT``, bit for bit with its per-tensor path (the one
        its default takes on the CPU), and with the clipping of the paper's later version. Its
        first step only initializes v from the first gradient. Its foreach path computes c(t)
        as a float32 tensor where its per-tensor path computes it in Python, which may round
        the bound differently; every strategy here computes it as the per-tensor path does.
        ``clip_lambda`` belongs to the optimizer, as there: each group records it in its
        ``clip`` entry (``"step**0.25"``, None, or ``"custom"`` for a function of yours, whose
        steps do not run on the flat kernel), and a loaded checkpoint does not change it.

    Args:
        params: the parameters to optimize: tensors, ``(name, tensor)`` pairs, or dicts
            defining parameter groups.
        lr: learning rate γ, a float or a one-element tensor, >= 0 (default: 1e-3).
        betas: (β_1, β_2), each in [0, 1) (default: (0.9, 0.9999)).
        eps: ε, >= 0 (default: 1e-6).
        clip_lambda: the clipping bound c as a function of the step t, or None
            (default: t^{1/4}).
        weight_decay: λ, >= 0 (default: 0).
        decouple: apply the decay to the parameters instead of the gradient (default: False).
        foreach: run the update over all of a group's tensors per operation; None lets polyak
            choose (default: None).
        maximize: maximize the objective instead of minimizing it (default: False).
        capturable: keep step counters on the device; accelerators only (default: False).
        differentiable: let autograd run through the step (default: False).
        fused: refused, as in torch-adopt (default: None).

    References:
        S. Taniguchi, K. Harada, G. Minegishi, Y. Oshima, S. C. Jeong, G. Nagahara, T. Iiyama,
        M. Suzuki, Y. Iwasawa, Y. Matsuo. ADOPT: Modified Adam Can Converge with Any β_2 with
        the Optimal Rate. NeurIPS 2024. https://arxiv.org/abs/2411.02853
    """

    state_keys = ("step", "exp_avg", "exp_avg_sq")
    step_tensors_message = _checks.STEP_TENSORS
    param_shaped_state = ("exp_avg", "exp_avg_sq")
    unsigned_state = ("exp_avg_sq",)
    backfill = {  # noqa: RUF012 - read-only table
        "maximize": False,
        "foreach": None,
        "capturable": False,
        "differentiable": False,
        "fused": None,
    }

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.9999),
        eps: float = 1e-6,
        clip_lambda: Callable[[int], float] | None = quarter_power,
        weight_decay: float = 0.0,
        decouple: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
    ) -> None:
        if clip_lambda is None:
            clip = None
        else:
            clip = _DEFAULT_CLIP if clip_lambda is quarter_power else _CUSTOM_CLIP
        defaults: dict[str, Any] = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "decouple": decouple,
            "maximize": maximize,
            "foreach": foreach,
            "capturable": capturable,
            "differentiable": differentiable,
            "fused": fused,
            "clip": clip,
        }
        self.check_hyperparameters(defaults)
        self.clip_lambda = clip_lambda
        # The optimizer's own setting, as torch-adopt keeps it: not a checkpoint's.
        self.fixed = {"clip": clip}  # type: ignore[misc]
        super().__init__(params, defaults)
        if fused:
            raise RuntimeError("`fused` is not currently supported")

    @staticmethod
    def check_hyperparameters(group: Mapping[str, Any]) -> None:
        """torch-adopt's checks, in its order and wording."""
        lr = group["lr"]
        if isinstance(lr, Tensor) and group["foreach"] and not group["capturable"]:
            raise ValueError(
                "lr as a Tensor is not supported for capturable=False and foreach=True"
            )
        _checks.check_tensor_lr(lr)
        _checks.check_at_least("learning rate", lr)
        _checks.check_at_least("epsilon value", group["eps"])
        _checks.check_betas(group["betas"])
        _checks.check_at_least("weight_decay value", group["weight_decay"])

    upgrade_state = _common.upgrade_step_state

    check_step = _common.dense_and_capturable(
        "ADOPT", foreach=("params and state_steps must be", False)
    )

    def hyperparameters(self, group: Mapping[str, Any], params: list[Tensor]) -> Hyper:
        """The group's hyperparameters, and a function of the user's as ``clip_lambda``."""
        if group.get("clip") == _CUSTOM_CLIP:
            return Hyper({**group, "clip_lambda": self.clip_lambda})
        return super().hyperparameters(group, params)

    def init_state(self, param: Tensor, hp: Hyper) -> dict[str, Tensor]:
        """A zero step counter and zero moments, as torch-adopt creates them."""
        return {
            "step": _common.zero_step(param, hp.capturable),
            "exp_avg": _common.zeros_like(param),
            "exp_avg_sq": _common.zeros_like(param),
        }

    @staticmethod
    def update(params: list[Tensor], grads: list[Tensor], state: StateLists, hp: Hyper) -> None:
        """Apply one ADOPT step to ``params`` given their ``grads``."""
        steps: list[Any] = state["step"]
        beta1, beta2 = hp.betas
        g = _ops.neg(grads) if hp.maximize else grads
        if hp.weight_decay != 0 and not hp.decouple:
            g = _ops.add_scaled(g, params, hp.weight_decay)
        # Complex parameters are updated as pairs of reals.
        p, g = _ops.as_real(params), _ops.as_real(g)
        m: list[Any] = _ops.as_real(state["exp_avg"])  # type: ignore[arg-type]
        v: list[Any] = _ops.as_real(state["exp_avg_sq"])  # type: ignore[arg-type]
        # t counts the steps before this one; the first step only initializes v.
        t = _ops.values(steps)
        _ops.increment_(steps)
        first = [s == 0 for s in t]
        if any(first):
            at = [i for i, f in enumerate(first) if f]
            g0 = [g[i] for i in at]
            _ops.addcmul_([v[i] for i in at], g0, g0, 1)
        if all(first):
            return
        at = [i for i, f in enumerate(first) if not f]
        p, g, m, v, t = ([x[i] for i in at] for x in (p, g, m, v, t))
        if hp.weight_decay != 0 and hp.decouple:
            _ops.add_scaled_(p, p, -hp.lr * hp.weight_decay)
        denom = _ops.sqrt(v)
        # max(√v, ε), as torch.clamp: NaN stays NaN.
        _ops.masked_fill_(denom, _ops.compare(denom, "lt", hp.eps), hp.eps)
        normed = _ops.copy(g)
        _ops.div_tensors_(normed, denom)
        if hp.clip is not None:
            # The bound is computed in Python, per tensor, as the per-tensor path does.
            fn = quarter_power if hp.clip == _DEFAULT_CLIP else hp.clip_lambda
            for x, s in zip(normed, t, strict=True):
                c = fn(s)
                _ops.clamp_([x], -c, c)
        _ops.lerp_(m, normed, 1 - beta1)
        _ops.add_scaled_(p, m, -hp.lr)
        _ops.mul_(v, beta2)
        _ops.addcmul_(v, g, g, 1 - beta2)
