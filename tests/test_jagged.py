"""hybrid.core.jagged: the one jagged → padded conversion (keep first / recent), fast path vs reference."""
from __future__ import annotations

import pytest
import torch

import hybrid.core.jagged as jagged
from hybrid.core.jagged import (
    jagged_to_padded,
    jagged_to_padded_reference,
    lengths_to_mask,
    padded_to_jagged,
    padded_to_jagged_reference,
)

LENGTHS = torch.tensor([3, 0, 5, 1, 9, 2])


def _values(dim: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(int(LENGTHS.sum()), dim, generator=torch.Generator().manual_seed(seed))


def _loop(values: torch.Tensor, lengths: torch.Tensor, t: int, keep: str) -> torch.Tensor:
    """The definition, written as a loop over sequences."""
    out = values.new_zeros((len(lengths), t, *values.shape[1:]))
    start = 0
    for b, n in enumerate(lengths.tolist()):
        rows = values[start:start + n]
        rows = rows[:t] if keep == "first" else rows[max(0, n - t):]
        out[b, :len(rows)] = rows
        start += n
    return out


def test_fbgemm_path_is_active():
    assert jagged._HAS_FBGEMM  # the pinned stack ships fbgemm; otherwise the tests compare ref vs ref


@pytest.mark.parametrize("keep", ["first", "recent"])
@pytest.mark.parametrize("max_len", [None, 7, 4, 1])
def test_fast_path_and_reference_match_the_definition_values_and_gradients(keep, max_len):
    values = _values()
    t = max_len or int(LENGTHS.max())
    results = {}
    for impl in ("fbgemm", "gather"):
        v = values.clone().requires_grad_(True)
        padded = jagged_to_padded(v, LENGTHS, max_len, keep=keep, impl=impl)
        (padded * torch.arange(1.0, t + 1).view(1, t, 1)).sum().backward()  # position-dependent weights
        results[impl] = (padded.detach(), v.grad)
    expected = _loop(values, LENGTHS, t, keep)
    for impl, (padded, grad) in results.items():
        assert padded.shape == (len(LENGTHS), t, 3)
        torch.testing.assert_close(padded, expected, atol=0, rtol=0, msg=impl)
    torch.testing.assert_close(results["fbgemm"][1], results["gather"][1], atol=0, rtol=0)
    torch.testing.assert_close(jagged_to_padded_reference(values, LENGTHS, max_len, keep=keep), expected)
    if max_len == 4:  # the dropped rows get no gradient: the oldest of a long row (recent) or its newest (first)
        row4 = slice(int(LENGTHS[:4].sum()), int(LENGTHS[:5].sum()))
        grad = results["gather"][1][row4].abs().sum(1)
        dropped = grad[:5] if keep == "recent" else grad[4:]
        assert torch.equal(dropped, torch.zeros(5))


@pytest.mark.parametrize("keep", ["first", "recent"])
def test_ids_padding_value_float64_and_empty(keep):
    ids = torch.tensor([1, 2, 3, 4, 5, 6])
    lengths = torch.tensor([2, 0, 4])
    want = {"first": [[1, 2, 0], [0, 0, 0], [3, 4, 5]], "recent": [[1, 2, 0], [0, 0, 0], [4, 5, 6]]}[keep]
    for impl in ("fbgemm", "gather"):
        assert jagged_to_padded(ids, lengths, 3, keep=keep, impl=impl).tolist() == want
        assert jagged_to_padded(ids, lengths, 3, keep=keep, impl=impl, padding_value=-1).tolist()[1] == [-1] * 3
    f64 = torch.randn(6, 2, dtype=torch.float64)  # no fbgemm kernel: the reference, transparently
    torch.testing.assert_close(jagged_to_padded(f64, lengths, 3, keep=keep),
                               jagged_to_padded_reference(f64, lengths, 3, keep=keep))
    for impl in ("fbgemm", "gather"):
        empty = jagged_to_padded(torch.zeros(0, 3), torch.tensor([0, 0]), 4, keep=keep, impl=impl)
        assert empty.shape == (2, 4, 3) and not empty.any()
    assert lengths_to_mask(lengths, 3).tolist() == [[True, True, False], [False] * 3, [True] * 3]


def test_keep_is_explicit_and_checked():
    with pytest.raises(TypeError, match="keep"):
        jagged_to_padded(torch.ones(2), torch.tensor([2]), 2)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match=r"keep must be one of \['first', 'recent'\], got 'last'"):
        jagged_to_padded(torch.ones(2), torch.tensor([2]), 2, keep="last")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="impl must be one of"):
        jagged_to_padded(torch.ones(2), torch.tensor([2]), 2, keep="first", impl="numpy")


def test_padded_to_jagged_inverts_and_matches_reference():
    lengths = torch.tensor([3, 0, 5, 1])
    values = torch.randn(int(lengths.sum()), 3)
    padded = torch.randn(4, 6, 3)
    fast_in, ref_in = padded.clone().requires_grad_(True), padded.clone().requires_grad_(True)
    fast, ref = padded_to_jagged(fast_in, lengths), padded_to_jagged_reference(ref_in, lengths)
    torch.testing.assert_close(fast, ref, atol=0, rtol=0)
    weight = torch.randn(fast.shape)
    (fast * weight).sum().backward()
    (ref * weight).sum().backward()
    torch.testing.assert_close(fast_in.grad, ref_in.grad, atol=0, rtol=0)
    for keep in ("first", "recent"):  # no row is longer than T: both keeps give the same, and invert
        torch.testing.assert_close(padded_to_jagged(jagged_to_padded(values, lengths, keep=keep), lengths), values)
