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
