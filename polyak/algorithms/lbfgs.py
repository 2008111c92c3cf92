"""L-BFGS: quasi-Newton steps from a limited history, with an optional Wolfe line search."""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Callable, Mapping
from typing import Any, cast

import torch
from torch import Tensor

from polyak import _checks, _ops
from polyak.optimizer import Optimizer, ParamsT

#: The sufficient-decrease (c1) and curvature (c2) constants of the strong Wolfe line search.
_WOLFE_C1, _WOLFE_C2 = 1e-4, 0.9

#: ``(loss, flat gradient, step length, evaluations)`` of a line search.
_Search = tuple[float, Tensor, Any, int]


class LBFGS(Optimizer, torch.optim.LBFGS):
    """L-BFGS: steps along an inverse-Hessian estimate built from the last few steps.

    All parameters are taken as one vector θ (complex ones as pairs of reals), with gradient
    g. Each ``step(closure)`` runs up to ``max_iter`` iterations k. The history holds the
    pairs s_i = θ_{i+1} - θ_i, y_i = g_{i+1} - g_i of the last ``history_size`` iterations
    whose curvature y_i^⊤ s_i exceeds 10^{-10}, with ρ_i = 1 / (y_i^⊤ s_i), and H = y^⊤ s /
    y^⊤ y of the newest pair. The direction r is found by the two-loop recursion:

    .. math::

        q ← -g_k

        a_i ← ρ_i s_i^⊤ q

        q ← q - a_i y_i

        r ← H q

        r ← r + (a_i - ρ_i y_i^⊤ r) s_i

        θ_{k+1} ← θ_k + η_k r

    where the second and third lines run over the history from the newest pair to the
    oldest, and the fifth from the oldest to the newest. The first iteration of all takes r =
    -g_k and η = min(1, 1 / ‖g_k‖_1) γ; the others η = γ, where γ = ``lr``. With
    ``line_search_fn="strong_wolfe"``, η is searched from there (cubic interpolation, then
    zoom) for the strong Wolfe conditions

    .. math::

        f(θ + η r) ≤ f(θ) + 10^{-4} η g^⊤ r

        |∇f(θ + η r)^⊤ r| ≤ 0.9 |g^⊤ r|

    A step stops after ``max_iter`` iterations or ``max_eval`` evaluations of the closure,
    when ‖g‖_∞ ≤ ``tolerance_grad``, when g^⊤ r > -``tolerance_change``, or when the step or
    the change of the loss falls below ``tolerance_change``.

    Note:
        As in torch.optim: one parameter group only, on one device; ``step`` needs a closure
        that re-evaluates the model and returns the loss, and returns the first loss it
        computed. The whole state (the history and the counters ``func_evals`` and ``n_iter``)
        is kept in the state of the first parameter, so that checkpoints interchange with
        torch's. Memory: ``history_size`` pairs of parameter-sized vectors.

    Args:
        params: the parameters to optimize (one group).
        lr: learning rate γ, a float or a one-element tensor, >= 0 (default: 1).
        max_iter: iterations per step (default: 20).
        max_eval: closure evaluations per step (default: ``max_iter * 5 // 4``).
        tolerance_grad: stop when ‖g‖_∞ is at most this (default: 1e-7).
        tolerance_change: stop when the step, the loss change or the directional derivative
            falls below this (default: 1e-9).
        history_size: the number of (s, y) pairs kept (default: 100).
        line_search_fn: ``"strong_wolfe"`` or None (default: None).

    References:
        D. C. Liu, J. Nocedal. On the limited memory BFGS method for large scale optimization.
        Mathematical Programming 45, 1989. https://doi.org/10.1007/BF01589116

        J. Nocedal, S. J. Wright. Numerical Optimization, 2nd ed., chapters 3 and 7. Springer,
        2006. https://doi.org/10.1007/978-0-387-40065-5
    """

    optional_strings = ("line_search_fn",)
    elementwise = False
    #: dynamo does not trace torch's step (it cannot trace the closure's backward, and the
    #: step reads numbers back at every iteration): under torch.compile it runs eagerly, as
    #: torch's does, so that the graphs and the numbers are torch's.
    eager_under_compile = True

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1,
        max_iter: int = 20,
        max_eval: int | None = None,
        tolerance_grad: float = 1e-7,
        tolerance_change: float = 1e-9,
        history_size: int = 100,
        line_search_fn: str | None = None,
    ) -> None:
        _checks.check_tensor_lr(lr)
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if max_eval is None:
            max_eval = max_iter * 5 // 4
        defaults: dict[str, Any] = {
            "lr": lr,
            "max_iter": max_iter,
            "max_eval": max_eval,
            "tolerance_grad": tolerance_grad,
            "tolerance_change": tolerance_change,
            "history_size": history_size,
            "line_search_fn": line_search_fn,
        }
        super().__init__(params, defaults)
        if len(self.param_groups) != 1:
            raise ValueError("LBFGS doesn't support per-parameter options (parameter groups)")

    @staticmethod
    def check_hyperparameters(group: Mapping[str, Any]) -> None:
        """LBFGS's check of its learning rate, in torch.optim's wording."""
        _checks.check_tensor_lr(group["lr"])
        if not 0.0 <= group["lr"]:
            raise ValueError(f"Invalid learning rate: {group['lr']}")

    @staticmethod
    def check_loaded_group(group: Mapping[str, Any]) -> None:
        """A loaded ``history_size`` is a whole number of at least 1: torch's step fails on
        any other (IndexError, TypeError)."""
        size = group["history_size"]
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"Invalid history_size: {size!r} (expected an int >= 1)")

    def upgrade_state(self, entry: dict[str, Any], group: Mapping[str, Any], param: Tensor) -> None:
        """Check the state a checkpoint gives, before anything is loaded: torch.optim loads any
        and fails in ``step()``. Once an iteration has run (``n_iter`` > 0) the history must be
        there: vectors of the parameters' total size, and numbers."""
        size = sum(2 * p.numel() if p.is_complex() else p.numel() for p in group["params"])
        for key in ("func_evals", "n_iter"):
            if key in entry and not _is_int(entry[key]):
                raise TypeError(f"Invalid LBFGS {key}: {entry[key]!r} (expected an int >= 0)")
        if entry.get("n_iter", 0) > 0:
            for key in _HISTORY_KEYS:
                if key not in entry:
                    raise KeyError(f"loaded LBFGS state has no {key!r} entry")
        for key in ("d", "prev_flat_grad"):
            if key in entry:
                _check_vector(key, entry[key], size)
        for key in ("t", "H_diag", "prev_loss"):
            if key in entry and not _is_number(entry[key]):
                raise TypeError(f"Invalid LBFGS {key}: {entry[key]!r} (expected a number)")
        lists = [entry.get(key) for key in ("old_dirs", "old_stps", "ro")]
        if any(v is not None for v in lists):
            if not all(isinstance(v, list) for v in lists):
                raise TypeError("Invalid LBFGS history: old_dirs, old_stps and ro must be lists")
            dirs, stps, ro = cast(list[list[Any]], lists)
            if not len(dirs) == len(stps) == len(ro):
                raise ValueError("Invalid LBFGS history: old_dirs, old_stps and ro differ in size")
            for key, vectors in (("old_dirs", dirs), ("old_stps", stps)):
                for vector in vectors:
                    _check_vector(key, vector, size)
            if not all(_is_number(r) for r in ro):
                raise TypeError(f"Invalid LBFGS ro: {ro!r} (expected numbers)")
        if "al" in entry:
            al = entry["al"]
            if not isinstance(al, list) or not all(a is None or _is_number(a) for a in al):
                raise TypeError(f"Invalid LBFGS al: {al!r} (expected a list of numbers)")
            if len(al) < len(entry.get("old_dirs") or []):
                raise ValueError("Invalid LBFGS al: shorter than the history")

    @property
    def _params(self) -> list[Tensor]:
        return self.param_groups[0]["params"]  # type: ignore[no-any-return]

    def _flat_grad(self) -> Tensor:
        """Every gradient as one vector: zeros for a parameter without one, dense for a sparse
        one, real pairs for a complex one."""
        grads = [p.grad for p in self._params]
        if all(
            g is not None and g.layout == torch.strided and g.is_contiguous() and not g.is_complex()
            for g in grads
        ):
            # One call concatenates them all, as torch.cat of their flat views does.
            return torch._C._nn.flatten_dense_tensors(cast(list[Tensor], grads))
        views = []
        for p in self._params:
            if p.grad is None:
                view = p.new(p.numel()).zero_()
            elif p.grad.is_sparse:
                view = p.grad.to_dense().view(-1)
            else:
                view = p.grad.view(-1)
            if torch.is_complex(view):
                view = torch.view_as_real(view).view(-1)
            views.append(view)
        return torch.cat(views, 0)

    def _move(self, step: Any, direction: Tensor) -> None:
        """``θ += step * direction``, with each parameter's part of the flat direction."""
        params = [torch.view_as_real(p) if torch.is_complex(p) else p for p in self._params]
        sizes = [p.numel() for p in params]
        if sum(sizes) != direction.numel():
            raise AssertionError(f"Expected offset {sum(sizes)} to equal {direction.numel()}")
        parts = direction.split_with_sizes(sizes)
        if all(p.is_contiguous() for p in params):
            targets = [p.view(-1) for p in params]
        else:
            targets, parts = params, tuple(d.view_as(p) for d, p in zip(parts, params, strict=True))
        # The step is read as a number once (torch reads a tensor step for every parameter).
        scale = step.item() if isinstance(step, Tensor) else step
        with _mode(params):
            _ops.add_scaled_(targets, list(parts), scale)

    def _evaluate(
        self, closure: Callable[[], Any], start: list[Tensor], step: Any, direction: Tensor
    ) -> tuple[float, Tensor]:
        """The loss and flat gradient at ``start + step * direction``; the parameters are put
        back to ``start`` afterwards."""
        self._move(step, direction)
        loss = float(closure())
        flat_grad = self._flat_grad()
        params = list(self._params)
        with _mode(params):
            _ops.copy_(params, start)
        return loss, flat_grad

    def step(self, closure: Callable[[], Any]) -> Any:  # type: ignore[override]
        """Perform one optimization step: up to ``max_iter`` L-BFGS iterations.

        Args:
            closure: re-evaluates the model and returns the loss; it runs with autograd
                enabled, and is called at least once.

        Returns:
            The loss the closure returned at the first evaluation.
        """
        if len(self.param_groups) != 1:
            raise AssertionError(
                f"Expected exactly one param_group, but got {len(self.param_groups)}"
            )
        first = self._params[0]
        # torch raises for an unknown line search once an iteration reaches it, after changing
        # the state: the state is put back first.
        kept: dict[str, Any] | None = None
        if self.param_groups[0]["line_search_fn"] not in (None, "strong_wolfe"):
            kept = copy.deepcopy(dict(self.state.get(first, {})))
        try:
            with torch.no_grad():
                loss = self._iterate(torch.enable_grad()(closure))
        except RuntimeError:
            if kept is not None:
                if kept:
                    self.state[first] = kept
                else:
                    self.state.pop(first, None)
            raise
        self._step_count += 1
        return loss

    def _iterate(self, closure: Callable[[], Any]) -> Any:
        group = self.param_groups[0]
        lr = group["lr"].squeeze() if isinstance(group["lr"], Tensor) else group["lr"]
        max_iter, max_eval = group["max_iter"], group["max_eval"]
        tolerance_grad, tolerance_change = group["tolerance_grad"], group["tolerance_change"]
        history_size = group["history_size"]
        line_search_fn = group["line_search_fn"]

        # The whole state lives with the first parameter, where load_state_dict casts it.
        state = self.state[self._params[0]]
        state.setdefault("func_evals", 0)
        state.setdefault("n_iter", 0)

        orig_loss = closure()
        loss = float(orig_loss)
        current_evals = 1
        state["func_evals"] += 1
        flat_grad = self._flat_grad()
        if _max_abs(flat_grad) <= tolerance_grad:
            return orig_loss

        d = state.get("d")
        t = state.get("t")
        old_dirs = state.get("old_dirs")
        old_stps = state.get("old_stps")
        ro = state.get("ro")
        h_diag = state.get("H_diag")
        prev_flat_grad = state.get("prev_flat_grad")
        prev_loss = state.get("prev_loss")

        n_iter = 0
        while n_iter < max_iter:
            n_iter += 1
            state["n_iter"] += 1

            # The direction: steepest descent at first, then the two-loop recursion.
            if state["n_iter"] == 1:
                d = flat_grad.neg()
                old_dirs, old_stps, ro = [], [], []
                h_diag = 1
            else:
                y = flat_grad.sub(prev_flat_grad)
                s = d.mul(t)
                ys = y.dot(s)
                if ys > 1e-10:
                    # Curvature is positive: the pair enters the history, the oldest leaves.
                    if len(old_dirs) == history_size:
                        old_dirs.pop(0)
                        old_stps.pop(0)
                        ro.pop(0)
                    old_dirs.append(y)
                    old_stps.append(s)
                    ro.append(1.0 / ys)
                    h_diag = ys / y.dot(y)
                num_old = len(old_dirs)
                if "al" not in state:
                    state["al"] = [None] * history_size
                al = state["al"]
                q = flat_grad.neg()
                for i in range(num_old - 1, -1, -1):
                    al[i] = old_stps[i].dot(q) * ro[i]
                    q.add_(old_dirs[i], alpha=-al[i])
                d = r = torch.mul(q, h_diag)
                for i in range(num_old):
                    be_i = old_dirs[i].dot(r) * ro[i]
                    r.add_(old_stps[i], alpha=al[i] - be_i)

            if prev_flat_grad is None:
                prev_flat_grad = flat_grad.clone(memory_format=torch.contiguous_format)
            else:
                prev_flat_grad.copy_(flat_grad)
            prev_loss = loss

            # The step length: scaled down by the gradient's size at the very first iteration.
            if state["n_iter"] == 1:
                first: Any = min(1.0, 1.0 / flat_grad.abs().sum())
                t = first * lr
            else:
                t = lr
            gtd = flat_grad.dot(d)
            if gtd > -tolerance_change:
                break  # not a descent direction (to tolerance)

            ls_func_evals = 0
            if line_search_fn is not None:
                if line_search_fn != "strong_wolfe":
                    raise RuntimeError("only 'strong_wolfe' is supported")
                start = [p.clone(memory_format=torch.contiguous_format) for p in self._params]
                loss, flat_grad, t, ls_func_evals = _strong_wolfe(
                    functools.partial(self._evaluate, closure, start),
                    t,
                    d,
                    loss,
                    flat_grad,
                    gtd,
                    tolerance_change=1e-9,
                    max_ls=max_eval - current_evals,
                )
                self._move(t, d)
                opt_cond = _max_abs(flat_grad) <= tolerance_grad
            else:
                self._move(t, d)
                opt_cond = False
                if n_iter != max_iter:
                    # A fixed step: the loss and gradient are re-evaluated except after the
                    # last iteration, which a stochastic objective would not use.
                    with torch.enable_grad():
                        loss = float(closure())
                    flat_grad = self._flat_grad()
                    opt_cond = _max_abs(flat_grad) <= tolerance_grad
                    ls_func_evals = 1
            current_evals += ls_func_evals
            state["func_evals"] += ls_func_evals

            if n_iter == max_iter or current_evals >= max_eval or opt_cond:
                break
            # Lack of progress: max|t d| as the maximum of |d| times |t|, which rounds alike.
            if _max_abs(d) * abs(t) <= tolerance_change:
                break
            if abs(loss - prev_loss) < tolerance_change:
                break

        state["d"] = d
        state["t"] = t
        state["old_dirs"] = old_dirs
        state["old_stps"] = old_stps
        state["ro"] = ro
        state["H_diag"] = h_diag
        state["prev_flat_grad"] = prev_flat_grad
        state["prev_loss"] = prev_loss
        return orig_loss


#: The state an iteration reads once one has run.
_HISTORY_KEYS = ("d", "t", "old_dirs", "old_stps", "ro", "H_diag", "prev_flat_grad", "prev_loss")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_number(value: Any) -> bool:
    if isinstance(value, Tensor):
        return value.numel() == 1 and not value.dtype.is_complex and value.dtype != torch.bool
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_vector(key: str, value: Any, size: int) -> None:
    """A flat vector of the parameters' total size (complex ones counted as pairs of reals)."""
    if not isinstance(value, Tensor):
        raise TypeError(f"Invalid LBFGS {key}: expected a Tensor, but got {torch.typename(value)}")
    if value.shape != (size,):
        raise ValueError(
            f"Invalid LBFGS {key}: a Tensor of shape {tuple(value.shape)}, expected ({size},)"
        )


def _max_abs(x: Tensor) -> Tensor:
    """max|x|, as ``x.abs().max()`` gives it (NaN where x holds one), from x's minimum and
    maximum in one pass, without the temporary |x|: negation is exact (and -0 reads as 0)."""
    if x.numel() == 0:
        return x.abs().max()  # torch's error for an empty vector
    low, high = torch.aminmax(x)
    return torch.maximum(high, low.neg()).abs_()


def _mode(params: list[Tensor]) -> contextlib.AbstractContextManager[Any]:
    """Per-tensor primitives unless every parameter is a CPU float32/float64 tensor, where
    torch's foreach kernels compute what the tensor methods compute."""
    batched = all(
        p.is_cpu and p.dtype in (torch.float32, torch.float64) and type(p) in _PLAIN for p in params
    )
    return contextlib.nullcontext() if batched else _ops.per_tensor()


_PLAIN = (Tensor, torch.nn.Parameter)


def _cubic_minimum(
    x1: Any, f1: Any, g1: Any, x2: Any, f2: Any, g2: Any, bounds: tuple[Any, Any] | None = None
) -> Any:
    """The minimizer, within ``bounds``, of the cubic through (x1, f1) and (x2, f2) with slopes
    g1 and g2; the middle of the bounds where the cubic has no minimum."""
    if bounds is not None:
        low, high = bounds
    else:
        low, high = (x1, x2) if x1 <= x2 else (x2, x1)
    d1 = g1 + g2 - 3 * (f1 - f2) / (x1 - x2)
    d2_square = d1**2 - g1 * g2
    if d2_square >= 0:
        d2 = d2_square.sqrt()
        if x1 <= x2:
            minimum = x2 - (x2 - x1) * ((g2 + d2 - d1) / (g2 - g1 + 2 * d2))
        else:
            minimum = x1 - (x1 - x2) * ((g1 + d2 - d1) / (g1 - g2 + 2 * d2))
        return min(max(minimum, low), high)
    return (low + high) / 2.0


def _strong_wolfe(
    evaluate: Callable[[Any, Tensor], tuple[float, Tensor]],
    t: Any,
    d: Tensor,
    f: float,
    g: Tensor,
    gtd: Tensor,
    tolerance_change: float = 1e-9,
    max_ls: int = 25,
) -> _Search:
    """A step length along ``d`` that meets the strong Wolfe conditions, from ``t``: first a
    bracket of such steps is found, growing the step by cubic extrapolation, then it is
    narrowed (zoom) by cubic interpolation. At most ``max_ls`` evaluations."""
    c1, c2 = _WOLFE_C1, _WOLFE_C2
    d_norm = _max_abs(d)
    g = g.clone(memory_format=torch.contiguous_format)
    f_new, g_new = evaluate(t, d)
    ls_func_evals = 1
    gtd_new = g_new.dot(d)

    t_prev, f_prev, g_prev, gtd_prev = 0, f, g, gtd
    done = False
    ls_iter = 0
    while ls_iter < max_ls:
        if f_new > (f + c1 * t * gtd) or (ls_iter > 1 and f_new >= f_prev):
            bracket = [t_prev, t]
            bracket_f = [f_prev, f_new]
            bracket_g = [g_prev, g_new.clone(memory_format=torch.contiguous_format)]
            bracket_gtd = [gtd_prev, gtd_new]
            break
        if abs(gtd_new) <= -c2 * gtd:
            bracket, bracket_f, bracket_g = [t], [f_new], [g_new]
            done = True
            break
        if gtd_new >= 0:
            bracket = [t_prev, t]
            bracket_f = [f_prev, f_new]
            bracket_g = [g_prev, g_new.clone(memory_format=torch.contiguous_format)]
            bracket_gtd = [gtd_prev, gtd_new]
            break
        # Extrapolate, between 1.01 and 10 times the step.
        min_step = t + 0.01 * (t - t_prev)
        max_step = t * 10
        tmp = t
        t = _cubic_minimum(t_prev, f_prev, gtd_prev, t, f_new, gtd_new, (min_step, max_step))
        t_prev = tmp
        f_prev = f_new
        g_prev = g_new.clone(memory_format=torch.contiguous_format)
        gtd_prev = gtd_new
        f_new, g_new = evaluate(t, d)
        ls_func_evals += 1
        gtd_new = g_new.dot(d)
        ls_iter += 1
    if ls_iter == max_ls:
        bracket = [0, t]
        bracket_f = [f, f_new]
        bracket_g = [g, g_new]

    # Zoom: narrow the bracket until a point meets the conditions.
    insuf_progress = False
    low_pos, high_pos = (0, 1) if bracket_f[0] <= bracket_f[-1] else (1, 0)
    while not done and ls_iter < max_ls:
        if abs(bracket[1] - bracket[0]) * d_norm < tolerance_change:
            break
        t = _cubic_minimum(
            bracket[0], bracket_f[0], bracket_gtd[0], bracket[1], bracket_f[1], bracket_gtd[1]
        )
        # A point too close to the bracket's ends, twice in a row or beyond them, is moved a
        # tenth of the bracket inside it.
        eps = 0.1 * (max(bracket) - min(bracket))
        if min(max(bracket) - t, t - min(bracket)) < eps:
            if insuf_progress or t >= max(bracket) or t <= min(bracket):
                if abs(t - max(bracket)) < abs(t - min(bracket)):
                    t = max(bracket) - eps
                else:
                    t = min(bracket) + eps
                insuf_progress = False
            else:
                insuf_progress = True
        else:
            insuf_progress = False
        f_new, g_new = evaluate(t, d)
        ls_func_evals += 1
        gtd_new = g_new.dot(d)
        ls_iter += 1
        if f_new > (f + c1 * t * gtd) or f_new >= bracket_f[low_pos]:
            # Not a sufficient decrease, or not below the low end: the new high end.
            bracket[high_pos] = t
            bracket_f[high_pos] = f_new
            bracket_g[high_pos] = g_new.clone(memory_format=torch.contiguous_format)
            bracket_gtd[high_pos] = gtd_new
            low_pos, high_pos = (0, 1) if bracket_f[0] <= bracket_f[1] else (1, 0)
        else:
            if abs(gtd_new) <= -c2 * gtd:
                done = True
            elif gtd_new * (bracket[high_pos] - bracket[low_pos]) >= 0:
                # The old low end becomes the high end.
                bracket[high_pos] = bracket[low_pos]
                bracket_f[high_pos] = bracket_f[low_pos]
                bracket_g[high_pos] = bracket_g[low_pos]
                bracket_gtd[high_pos] = bracket_gtd[low_pos]
            bracket[low_pos] = t
            bracket_f[low_pos] = f_new
            bracket_g[low_pos] = g_new.clone(memory_format=torch.contiguous_format)
            bracket_gtd[low_pos] = gtd_new
    return bracket_f[low_pos], bracket_g[low_pos], bracket[low_pos], ls_func_evals
