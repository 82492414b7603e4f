import pytest
import torch

from steerlab.errors import UserError
from steerlab.steering import SteeringVector
from steerlab.steering.dimensions import (
    check_fraction,
    check_selection,
    dimension_count,
    dimension_indices,
    dimension_mask,
    restrict,
    with_norms_of,
)


def _vector():
    a = torch.tensor([0.5, -3.0, 1.0, 0.0, 2.0, -2.0, 0.1, 4.0, -0.2, 1.5])
    b = torch.tensor([1.0, 1.0, -5.0, 0.3, 0.0, 0.0, 2.5, 0.0, 0.0, -0.4])
    return SteeringVector({3: a, 5: b}, {"method": "mean-difference", "residual_norms": {"3": 7.0, "5": 9.0}})


def test_counts_round_up_and_keep_at_least_one():
    assert dimension_count(0.7, 10) == 7  # 0.7 * 10 is 7.000000000000001 in floating point
    assert dimension_count(0.25, 10) == 3
    assert dimension_count(0.01, 10) == 1
    assert dimension_count(1.0, 10) == 10


def test_first_random_and_top_by_hand():
    values = _vector().vectors[3]
    assert dimension_indices(values, "first", 0.3).tolist() == [0, 1, 2]
    assert dimension_indices(values, "first-k", 0.3).tolist() == [0, 1, 2]
    # |v| = .5 3 1 0 2 2 .1 4 .2 1.5 -> largest four: 7 (4), 1 (3), 4 and 5 (2; tie kept in index order)
    assert dimension_indices(values, "top", 0.4).tolist() == [1, 4, 5, 7]
    expected = torch.randperm(10, generator=torch.Generator().manual_seed(3))[:5].sort().values
    assert torch.equal(dimension_indices(values, "random", 0.5, seed=3), expected)
    smaller = dimension_indices(values, "random", 0.2, seed=3).tolist()
    assert set(smaller) <= set(expected.tolist())  # one seed: nested subsets
    assert dimension_mask(values, "first", 0.2).tolist() == [True, True] + [False] * 8


def test_restrict_zeroes_the_rest_and_records_how():
    vector = _vector()
    top = restrict(vector, "top", 0.2)
    assert top.vectors[3].tolist() == [0, -3.0, 0, 0, 0, 0, 0, 4.0, 0, 0]
    assert top.vectors[5].tolist() == [0, 0, -5.0, 0, 0, 0, 2.5, 0, 0, 0]  # per layer
    assert top.norm(3) == pytest.approx(5.0)
    assert top.metadata["dimensions"] == {"selection": "top", "fraction": 0.2, "k": 2, "width": 10}
    assert top.residual_norm(3) == 7.0 and top.metadata["method"] == "mean-difference"
    first = restrict(vector, "first", 0.3)
    assert first.vectors[5].tolist() == [1.0, 1.0, -5.0] + [0.0] * 7
    assert restrict(vector, "random", 0.5, seed=1).metadata["dimensions"]["seed"] == 1
    # a control restricted to the steering vector's top dimensions, at its norm
    noise = SteeringVector({3: torch.ones(10), 5: torch.arange(1.0, 11.0)})
    control = with_norms_of(restrict(noise, "top", 0.2, reference=vector), top)
    assert control.vectors[5].nonzero().flatten().tolist() == [2, 6]
    assert control.norm(5) == pytest.approx(top.norm(5))


def test_bad_fraction_or_selection_names_the_argument():
    vector = _vector()
    for bad in (0, -0.5, 1.5, float("nan")):
        with pytest.raises(UserError, match="fraction"):
            restrict(vector, "first", bad)
    with pytest.raises(UserError, match="selection: unknown dimension selection 'last'"):
        restrict(vector, "last", 0.5)
    with pytest.raises(UserError, match="--dims"):
        check_selection("middle", "--dims")
    with pytest.raises(UserError, match="--dim-fractions"):
        check_fraction(2.0, "--dim-fractions")
    with pytest.raises(UserError, match="zero on all 1 dimensions"):
        restrict(SteeringVector({0: torch.tensor([0.0, 1.0])}), "first", 0.5)
