import pytest

from sparsellm.report.knee import essential_sparsity, kneedle
from sparsellm.report.plots import pareto_front


def test_kneedle_finds_the_last_point_before_the_cliff():
    # hand-checked gaps x_norm - y_norm: 0, .429-.02, .714-.06, .857-.2, 0
    xs = [0.0, 0.3, 0.5, 0.6, 0.7]
    ys = [0.0, 0.01, 0.03, 0.10, 0.50]
    d = [x / 0.7 - y / 0.5 for x, y in zip(xs, ys, strict=True)]
    assert d[2] == pytest.approx(0.654, abs=1e-3) and d[3] == pytest.approx(0.657, abs=1e-3)
    assert kneedle(xs, ys) == 3


def test_no_knee_for_linear_concave_or_short_curves():
    assert kneedle([0, 0.5, 1], [0, 0.5, 1]) is None
    assert kneedle([0, 0.5, 1], [0, 0.9, 1]) is None
    assert kneedle([0, 1], [0, 1]) is None


def test_essential_sparsity_uses_log_ppl_ratio_with_dense_origin():
    # log(ppl/20) = .010, .049, .262, 1.099, 2.996 at .3 .. .7; with the dense origin the
    # normalised gaps x - y are 0, .425, .555, .627, .490, 0: the knee is at 0.5
    ppls = [20.2, 21.0, 26.0, 60.0, 400.0]
    assert essential_sparsity([0.3, 0.4, 0.5, 0.6, 0.7], ppls, 20.0) == 0.5
    assert (
        essential_sparsity([0.7, 0.3, 0.5, 0.4, 0.6], [400.0, 20.2, 26.0, 21.0, 60.0], 20.0) == 0.5
    )


def test_pareto_front_keeps_only_undominated_points():
    pts = [(1.0, 0.5, "a"), (2.0, 0.6, "b"), (2.0, 0.4, "c"), (3.0, 0.6, "d"), (0.5, 0.1, "e")]
    assert pareto_front(pts, higher_is_better=True) == [4, 0, 1]
    assert pareto_front([(1, 10.0, "a"), (2, 5.0, "b"), (3, 6.0, "c")], False) == [0, 1]
