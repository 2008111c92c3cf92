"""Defects found by trials of polyak's guarantees, each reproduced as a user hits it."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import polyak


def _lbfgs_step(opt: Any, params: list[torch.Tensor]) -> None:
    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = sum((p**2).sum() for p in params)
        loss.backward()  # type: ignore[union-attr]
        return loss  # type: ignore[return-value]

    opt.step(closure)


@pytest.mark.parametrize(
    ("name", "key", "values"),
    [
        ("LBFGS", "line_search_fn", (None, "strong_wolfe")),
        ("Muon", "adjust_lr_fn", (None, "match_rms_adamw")),
    ],
)
@pytest.mark.parametrize("direction", ["none-to-str", "str-to-none"])
def test_a_checkpoint_with_a_string_or_none_loads_as_in_torch(
    name: str, key: str, values: tuple[Any, Any], direction: str
) -> None:
    """torch loads a checkpoint whose string option is None where the optimizer's is a string,
    or the reverse, and takes the checkpoint's value: so does polyak, and then steps as torch."""
    saved_value, held_value = values if direction == "none-to-str" else values[::-1]
    torch.manual_seed(0)
    shape = (4, 3)
    results = []
    for module in (torch.optim, polyak):
        cls = getattr(module, name)
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(shape))
        source = cls([p], **{key: saved_value})
        if name == "LBFGS":
            _lbfgs_step(source, [p])
        else:
            p.grad = torch.randn(shape)
            source.step()
        q = torch.nn.Parameter(p.detach().clone())
        target = cls([q], **{key: held_value})
        target.load_state_dict(source.state_dict())
        assert target.param_groups[0][key] == saved_value
        if name == "LBFGS":
            _lbfgs_step(target, [q])
        else:
            q.grad = torch.ones(shape)
            target.step()
        results.append(q.detach())
    assert torch.equal(results[0], results[1])


def test_a_string_no_constructor_takes_is_still_refused() -> None:
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = polyak.Muon([p])
    saved = opt.state_dict()
    saved["param_groups"][0]["adjust_lr_fn"] = "no such rule"
    with pytest.raises(ValueError, match="not supported"):
        opt.load_state_dict(saved)
    assert opt.param_groups[0]["adjust_lr_fn"] is None


def _snapshot(opt: Any, params: list[torch.Tensor]) -> list[Any]:
    return [p.detach().clone() for p in params] + [
        {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in opt.state[p].items()}
        for p in params
    ]


def _same(a: list[Any], b: list[Any]) -> bool:
    def eq(x: Any, y: Any) -> bool:
        if isinstance(x, torch.Tensor):
            return isinstance(y, torch.Tensor) and torch.equal(x, y)
        if isinstance(x, dict):
            return x.keys() == y.keys() and all(eq(x[k], y[k]) for k in x)
        return bool(x == y)

    return len(a) == len(b) and all(eq(x, y) for x, y in zip(a, b, strict=True))


ELEMENTWISE = ["Adam", "AdamW", "RMSprop", "Adamax", "NAdam", "RAdam", "Adadelta", "ASGD", "Rprop"]
ELEMENTWISE += ["Adagrad", "SGD"]


@pytest.mark.parametrize("name", ELEMENTWISE)
@pytest.mark.parametrize("flags", [{}, {"foreach": False}, {"foreach": True}], ids=str)
@pytest.mark.parametrize("bad", ["shape", "dtype"])
def test_a_step_failing_on_a_later_gradient_changes_nothing(
    name: str, flags: dict[str, Any], bad: str
) -> None:
    """A wrong gradient on the second parameter (set through ``.grad.data``, which autograd
    does not check): torch's error type, and neither parameter nor any state changed."""
    kwargs: dict[str, Any] = {"lr": 0.1, **flags} if name == "SGD" else dict(flags)
    if name == "SGD":
        kwargs["momentum"] = 0.9
    errors = []
    for module in (torch.optim, polyak):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(4)) for _ in range(2)]
        opt = getattr(module, name)(params, **kwargs)
        for p in params:
            p.grad = torch.randn(4)
        opt.step()
        for p in params:
            p.grad = torch.randn(4)
        if bad == "shape":
            params[1].grad.data = torch.ones(3)  # type: ignore[union-attr]
        else:
            params[1].grad.data = torch.ones(4, dtype=torch.float64)  # type: ignore[union-attr]
        before = _snapshot(opt, params)
        try:
            opt.step()
            errors.append(None)
        except Exception as error:
            errors.append(type(error))
            if module is polyak:
                assert _same(_snapshot(opt, params), before)
    assert errors[1] == errors[0]


STEPPED = [*ELEMENTWISE[:-1], "Adafactor"]


@pytest.mark.parametrize("name", STEPPED)
@pytest.mark.parametrize("flags", [{}, {"foreach": False}, {"foreach": True}], ids=str)
def test_a_step_count_set_to_a_string_raises_torchs_error_and_changes_nothing(
    name: str, flags: dict[str, Any]
) -> None:
    outcomes = []
    for module in (torch.optim, polyak):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(4, 3)) for _ in range(2)]
        opt = getattr(module, name)(params, **flags)
        for p in params:
            p.grad = torch.randn(4, 3)
        opt.step()
        opt.state[params[1]]["step"] = "3"
        before = _snapshot(opt, params)
        with pytest.raises(Exception) as caught:
            opt.step()
        # torch's message where it checks on purpose; where a later operation fails on the
        # string (ASGD), the type of its error.
        message = str(caught.value) if caught.type is RuntimeError else ""
        outcomes.append((caught.type, message))
        if module is polyak:
            assert _same(_snapshot(opt, params), before)
    assert outcomes[1] == outcomes[0]


BAD_STEPS = {
    "string": "3",
    "complex": torch.tensor(2 + 1j),
    "negative": torch.tensor(-1.0),
    "nan": torch.tensor(float("nan")),
    "inf": float("inf"),
}


@pytest.mark.parametrize("name", [*STEPPED, "SparseAdam"])
@pytest.mark.parametrize("bad", list(BAD_STEPS))
def test_a_checkpoint_with_a_step_no_training_makes_is_refused_unchanged(
    name: str, bad: str
) -> None:
    """torch loads these (but a string, for most) and fails or computes nonsense in step();
    polyak refuses them at load with a ValueError, and the optimizer is as it was."""
    sparse = name == "SparseAdam"
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = getattr(polyak, name)([p])
    p.grad = torch.randn(4, 3).to_sparse() if sparse else torch.randn(4, 3)
    opt.step()
    saved = opt.state_dict()
    value = BAD_STEPS[bad]
    saved["state"][0]["step"] = value.clone() if isinstance(value, torch.Tensor) else value
    q = torch.nn.Parameter(torch.randn(4, 3))
    target = getattr(polyak, name)([q])
    q.grad = torch.randn(4, 3).to_sparse() if sparse else torch.randn(4, 3)
    target.step()
    before = _snapshot(target, [q])
    with pytest.raises(ValueError, match="Invalid step"):
        target.load_state_dict(saved)
    assert _same(_snapshot(target, [q]), before)


@pytest.mark.parametrize("name", ["SGD", "Adagrad", "Adam", "AdamW"])
def test_a_fused_step_refuses_a_gradient_of_another_dtype_as_torchs(name: str) -> None:
    """torch's fused kernels raise for a float64 gradient of a float32 parameter (after
    stepping the parameters before it); polyak's fused steps raise the same error before
    changing anything, where they used to step or raise another message."""
    kwargs: dict[str, Any] = {"lr": 0.1, "momentum": 0.9} if name == "SGD" else {}
    messages = []
    for module in (torch.optim, polyak):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(4)) for _ in range(2)]
        opt = getattr(module, name)(params, fused=True, **kwargs)
        for p in params:
            p.grad = torch.randn(4)
        opt.step()
        params[1].grad.data = torch.randn(4, dtype=torch.float64)  # type: ignore[union-attr]
        before = _snapshot(opt, params)
        with pytest.raises(RuntimeError) as caught:
            opt.step()
        messages.append(str(caught.value))
        if module is polyak:
            assert _same(_snapshot(opt, params), before)
    assert messages[1] == messages[0] == "expected scalar type Float but found Double"


@pytest.mark.parametrize(
    ("name", "key", "value"),
    [
        ("LBFGS", "history_size", -1),
        ("LBFGS", "history_size", 0),
        ("LBFGS", "history_size", float("nan")),
        ("LBFGS", "history_size", float("inf")),
        ("Muon", "ns_steps", -1.0),
        ("Muon", "ns_steps", float("nan")),
        ("Muon", "ns_steps", float("inf")),
        ("Muon", "ns_steps", torch.tensor(5)),
        ("Muon", "ns_steps", 100),
    ],
    ids=str,
)
def test_a_loaded_value_no_step_runs_with_is_refused_unchanged(
    name: str, key: str, value: Any
) -> None:
    """torch's constructor takes these and its step fails on them; polyak's load refuses them
    with a ValueError, and the optimizer is as it was."""
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = getattr(polyak, name)([p])
    saved = opt.state_dict()
    saved["param_groups"][0][key] = value
    before = dict(opt.param_groups[0])
    with pytest.raises(ValueError, match=f"Invalid {key}"):
        opt.load_state_dict(saved)
    assert opt.param_groups[0] == before


def test_a_muon_checkpoint_with_negative_ns_steps_runs_as_torchs() -> None:
    """A negative whole number runs no Newton-Schulz iteration in torch: it loads and steps."""
    results = []
    for module in (torch.optim, polyak):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(4, 3))
        opt = module.Muon([p])
        saved = opt.state_dict()
        saved["param_groups"][0]["ns_steps"] = -1
        opt.load_state_dict(saved)
        p.grad = torch.randn(4, 3)
        opt.step()
        results.append(p.detach().clone())
    assert torch.equal(results[0], results[1])
