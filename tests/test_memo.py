"""Each parameter group's memos live in one object, which knows its group and which loading a
checkpoint drops."""

from __future__ import annotations

import torch

import polyak
from polyak import _memo


def test_a_group_replaced_by_an_equal_dict_starts_afresh() -> None:
    p = torch.nn.Parameter(torch.randn(4))
    opt = polyak.Adam([p], foreach=False)
    p.grad = torch.randn(4)
    opt.step()
    old = opt.param_groups[0]
    kept = _memo.memo(opt, old)
    assert kept.hypers is not None and kept.rehearsed is not None
    new = dict(old)
    opt.param_groups[0] = new
    assert _memo.peek(opt, new) is None
    opt.step()
    found = _memo.peek(opt, new)
    assert found is not None and found is not kept and found.group is new


def test_loading_a_checkpoint_drops_every_memo() -> None:
    p = torch.nn.Parameter(torch.randn(4))
    opt = polyak.AdamW([p])
    p.grad = torch.randn(4)
    opt.step()
    opt.step()
    assert _memo.memos(opt)
    opt.load_state_dict(opt.state_dict())
    assert _memo.memos(opt) == []
    opt.step()
    assert _memo.memos(opt)
