"""Defects found by trials of polyak's guarantees, each reproduced as a user hits it."""

from __future__ import annotations

import copy
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


def _stepped(module: Any, name: str, count: int, **kwargs: Any) -> tuple[Any, list[torch.Tensor]]:
    """``module``'s optimizer ``name`` over ``count`` seeded parameters of 4 elements, after
    one step with random gradients."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4)) for _ in range(count)]
    opt = getattr(module, name)(params, **kwargs)
    for p in params:
        p.grad = torch.randn(4)
    opt.step()
    return opt, params


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
        opt, params = _stepped(module, name, 2, **kwargs)
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


FUSED = ["SGD", "Adam", "AdamW", "Adagrad"]


@pytest.mark.parametrize(
    ("name", "flags"),
    [
        (name, flags)
        for name in ELEMENTWISE
        for flags in [{}, {"foreach": False}, {"foreach": True}, {"fused": True}]
        if name in FUSED or not flags.get("fused")
    ],
    ids=str,
)
@pytest.mark.parametrize("first_step", [False, True], ids=["stepped", "first-step"])
def test_a_step_failing_in_a_later_group_changes_no_group(
    name: str, flags: dict[str, Any], first_step: bool
) -> None:
    """A wrong gradient in the second group: torch steps the first group and then raises;
    polyak raises torch's error type before any group changes, state created for a first
    step included."""
    kwargs: dict[str, Any] = {"lr": 0.1, "momentum": 0.9} if name == "SGD" else {}
    errors = []
    for module in (torch.optim, polyak):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(4)) for _ in range(3)]
        groups = [{"params": params[:2]}, {"params": params[2:], "weight_decay": 0.1}]
        opt = getattr(module, name)(groups, **kwargs, **flags)
        if not first_step:
            for p in params:
                p.grad = torch.randn(4)
            opt.step()
        for p in params:
            p.grad = torch.randn(4)
        # torch's fused kernels step on a gradient of the wrong size, and refuse one of
        # another dtype.
        bad = torch.ones(4, dtype=torch.float64) if flags.get("fused") else torch.ones(3)
        params[2].grad.data = bad  # type: ignore[union-attr]
        before = [p.detach().clone() for p in params]
        state_before = copy.deepcopy(opt.state_dict())
        try:
            opt.step()
            errors.append(None)
        except Exception as error:
            errors.append(type(error))
            if module is polyak:
                assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))
                assert _same([opt.state_dict()], [state_before])
                assert len(opt.state) == (0 if first_step and name != "Adagrad" else 3)
    assert errors[0] is not None
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
        opt, params = _stepped(module, name, 2, fused=True, **kwargs)
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


@pytest.mark.parametrize("name", ["Adam", "RMSprop", "Adagrad"])
def test_a_checkpoint_step_of_none_is_refused_with_torchs_type_error(name: str) -> None:
    """torch's loading reads a step that is not a tensor with ``float()``, which raises a
    TypeError for None; polyak's raises the same, with the same message, unchanged."""
    errors = []
    for module in (torch.optim, polyak):
        p = torch.nn.Parameter(torch.randn(4, 3))
        opt = getattr(module, name)([p])
        p.grad = torch.randn(4, 3)
        opt.step()
        saved = opt.state_dict()
        saved["state"][0]["step"] = None
        before = _snapshot(opt, [p])
        with pytest.raises(TypeError) as caught:
            opt.load_state_dict(saved)
        errors.append(str(caught.value))
        if module is polyak:
            assert _same(_snapshot(opt, [p]), before)
    assert errors[1] == errors[0]


@pytest.mark.parametrize(
    ("name", "key"), [("NAdam", "mu_product"), ("ASGD", "eta"), ("ASGD", "mu")]
)
def test_a_checkpoint_state_number_of_none_is_refused_with_torchs_type_error(
    name: str, key: str
) -> None:
    """torch's loading makes tensors of these entries, and raises a TypeError for None;
    polyak's raised a KeyError, as for an entry left out."""
    errors = []
    for module in (torch.optim, polyak):
        p = torch.nn.Parameter(torch.randn(4, 3))
        opt = getattr(module, name)([p])
        p.grad = torch.randn(4, 3)
        opt.step()
        saved = opt.state_dict()
        saved["state"][0][key] = None
        before = _snapshot(opt, [p])
        with pytest.raises(TypeError) as caught:
            opt.load_state_dict(saved)
        errors.append(str(caught.value))
        if module is polyak:
            assert _same(_snapshot(opt, [p]), before)
    assert errors[1] == errors[0]


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_a_fused_step_takes_capturable_on_the_cpu_as_torchs(name: str) -> None:
    """torch's fused kernels take ``capturable=True`` on any device (the step counters are on
    the parameters' device for a fused step anyway); polyak's fused step raised the
    AssertionError of torch's other paths."""
    results = []
    for module in (torch.optim, polyak):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(4, 3))
        opt = getattr(module, name)([p], fused=True, capturable=True)
        for _ in range(3):
            p.grad = torch.randn(4, 3)
            opt.step()
        results.append((p.detach().clone(), opt.state[p]["step"].clone()))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


def test_a_fused_sgd_step_with_a_buffer_removed_raises_torchs_error_unchanged() -> None:
    """Where some parameters have a momentum buffer and others none, torch's fused kernel is
    handed None and raises a TypeError (it starts the buffers only where none has one);
    polyak's fused step started the missing buffer and stepped."""
    errors = []
    for module in (torch.optim, polyak):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(3)) for _ in range(3)]
        opt = module.SGD(params, lr=0.1, momentum=0.9, fused=True)
        for p in params:
            p.grad = torch.randn(3)
        opt.step()
        del opt.state[params[1]]["momentum_buffer"]
        before = _snapshot(opt, params)
        with pytest.raises(TypeError) as caught:
            opt.step()
        errors.append(str(caught.value))
        if module is polyak:
            assert _same(_snapshot(opt, params), before)
    assert errors[1] == errors[0] == "expected Tensor as element 1 in argument 2, but got NoneType"


def test_a_muon_buffer_of_another_shape_raises_torchs_error_unchanged() -> None:
    """A momentum buffer given a leading unit dimension by hand broadcasts in the momentum
    update, and torch's Newton–Schulz iteration then refuses the 3-D direction with a
    ValueError; polyak's raised the RuntimeError of a batched matrix product."""
    errors = []
    for module in (torch.optim, polyak):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(4, 3))
        opt = module.Muon([p])
        p.grad = torch.randn(4, 3)
        opt.step()
        opt.state[p]["momentum_buffer"] = opt.state[p]["momentum_buffer"].unsqueeze(0)
        p.grad = torch.randn(4, 3)
        before = _snapshot(opt, [p])
        with pytest.raises(ValueError) as caught:
            opt.step()
        errors.append(str(caught.value))
        if module is polyak:
            assert _same(_snapshot(opt, [p]), before)
    assert errors[1] == errors[0] == "Input tensor gradient must be a 2D matrix"


@pytest.mark.parametrize("value", [1, 0, 1.0, torch.tensor(True), torch.tensor(1)], ids=repr)
def test_a_checkpoint_flag_given_as_a_number_equal_to_a_bool_loads_as_in_torch(value: Any) -> None:
    """Both constructors take ``maximize=1`` (or a one-element tensor) and keep it as given, so
    a checkpoint may hold it: torch loads it into an optimizer holding a bool, and so does
    polyak, which refused it with a TypeError (its own checkpoint, too); both then step alike.
    A number no bool equals (0.5) is still refused."""
    results = []
    for module in (torch.optim, polyak):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(4, 3))
        source = module.Adam([p], maximize=value, amsgrad=value)
        p.grad = torch.randn(4, 3)
        source.step()
        q = torch.nn.Parameter(p.detach().clone())
        target = module.Adam([q])
        target.load_state_dict(source.state_dict())
        for _ in range(2):
            q.grad = torch.randn(4, 3)
            target.step()
        results.append(q.detach().clone())
    assert torch.equal(results[0], results[1])
    saved = polyak.Adam([torch.nn.Parameter(torch.randn(3))], maximize=0.5).state_dict()
    with pytest.raises(TypeError, match="expected a bool"):
        polyak.Adam([torch.nn.Parameter(torch.randn(3))]).load_state_dict(saved)


@pytest.mark.parametrize(
    ("name", "key"),
    [("Adam", "lr"), ("AdamW", "foreach"), ("SGD", "momentum"), ("Adagrad", "eps")],
)
@pytest.mark.parametrize("flags", [{}, {"foreach": True}, {"fused": True}], ids=str)
def test_a_group_key_removed_by_hand_raises_torchs_key_error_unchanged(
    name: str, key: str, flags: dict[str, Any]
) -> None:
    """torch's step reads ``group[key]`` and raises KeyError; polyak's raised AttributeError,
    or stepped with a default."""
    if key == "foreach" and "foreach" in flags:
        flags = {}
    for module in (torch.optim, polyak):
        opt, params = _stepped(module, name, 2, **flags)
        del opt.param_groups[0][key]
        before = _snapshot(opt, params)
        with pytest.raises(KeyError, match=key):
            opt.step()
        assert _same(_snapshot(opt, params), before)


def test_rprop_steps_without_lr_once_its_state_exists_as_torchs() -> None:
    """Only a parameter's first Rprop step reads ``lr``."""
    results = []
    for module in (torch.optim, polyak):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(4))
        opt = module.Rprop([p])
        p.grad = torch.randn(4)
        opt.step()
        del opt.param_groups[0]["lr"]
        p.grad = torch.randn(4)
        opt.step()
        results.append(p.detach().clone())
        q = torch.nn.Parameter(torch.randn(4))
        opt.add_param_group({"params": [q], "lr": 0.1})
        del opt.param_groups[1]["lr"]
        q.grad = torch.randn(4)
        with pytest.raises(KeyError, match="lr"):
            opt.step()
    assert torch.equal(results[0], results[1])


@pytest.mark.parametrize(
    ("name", "key", "flags"),
    [
        ("Adam", "exp_avg_sq", {"foreach": True}),
        ("Adam", "step", {"foreach": True}),
        ("Adagrad", "sum", {"foreach": True}),
        ("AdamW", "exp_avg", {"fused": True}),
        ("RMSprop", "square_avg", {"foreach": True}),
    ],
)
def test_foreach_and_fused_steps_refuse_state_of_another_dtype_as_torchs(
    name: str, key: str, flags: dict[str, Any]
) -> None:
    """torch's foreach and fused steps cannot group a float16 state tensor beside a float32
    parameter and raise RuntimeError; polyak's stepped. bfloat16 state is grouped (torch's
    fused kernel then refuses it with its own message, as polyak's does with another)."""
    for dtype, fails in ((torch.float16, True), (torch.bfloat16, False)):
        outcomes = []
        for module in (torch.optim, polyak):
            opt, params = _stepped(module, name, 2, **flags)
            opt.state[params[1]][key] = opt.state[params[1]][key].to(dtype)
            before = _snapshot(opt, params)
            try:
                opt.step()
                outcomes.append(None)
            except RuntimeError as error:
                outcomes.append(str(error))
                if module is polyak:
                    assert _same(_snapshot(opt, params), before)
        if fails:
            assert outcomes[0] is not None
            assert outcomes[0] == outcomes[1]
        else:
            assert (outcomes[0] is None) is (outcomes[1] is None)


@pytest.mark.parametrize("flags", [{"foreach": False}, {"foreach": True}], ids=str)
@pytest.mark.parametrize("value", [None, "a string", [1.0]], ids=repr)
def test_a_state_tensor_replaced_by_another_value_raises_torchs_error_type(
    flags: dict[str, Any], value: Any
) -> None:
    """torch's per-tensor step calls the value's in-place methods (AttributeError), its
    foreach step fails to group it (TypeError); polyak's raised one type on both."""
    errors = []
    for module in (torch.optim, polyak):
        opt, params = _stepped(module, "Adam", 2, **flags)
        opt.state[params[1]]["exp_avg"] = value
        before = [p.detach().clone() for p in params]
        with pytest.raises(Exception) as caught:
            opt.step()
        errors.append(caught.type)
        if module is polyak:
            assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))
    assert errors[1] is errors[0]
