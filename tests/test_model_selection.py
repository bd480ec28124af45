"""Feature selectors: PCA in torch equals scikit-learn; weight/std selectors pick the right indices."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA

from ihd_node.model.selection import IndexSelector, PCASelector, build_selector, fit_selector


def _features(n: int = 200, d: int = 24, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(n, 5))
    return (latent @ rng.normal(size=(5, d)) + 0.1 * rng.normal(size=(n, d)) + 3.0).astype(np.float32)


def test_pca_in_torch_equals_sklearn_transform() -> None:
    x = _features()
    selector = fit_selector("pca", x, 6)
    assert isinstance(selector, PCASelector)
    assert (selector.kind, selector.in_dim, selector.out_dim) == ("pca", 24, 6)
    expected = PCA(n_components=6, random_state=0).fit(x.astype(np.float64)).transform(x)
    got = selector(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4)
    # Works on (B, T, D) scans as well, and its numbers live in the state_dict.
    assert selector(torch.from_numpy(x).view(10, 20, 24)).shape == (10, 20, 6)
    assert set(selector.state_dict()) == {"mean", "components"}


def test_weight_selectors_summed_reading_ranks_by_summed_absolute_head_weight() -> None:
    x = _features(d=8)
    weight = np.zeros((6, 8))
    # |w| summed over classes: feature j scores [3, 0.5, 7, 1, 6, 0.1, 2, 4]
    weight[0] = [3, -0.5, 1, 1, -6, 0.1, 2, -4]
    weight[1] = [0, 0, -6, 0, 0, 0, 0, 0]
    largest = fit_selector("weight_largest", x, 3, head_weight=weight, weight_reading="summed")
    smallest = fit_selector("weight_smallest", x, 3, head_weight=weight, weight_reading="summed")
    assert isinstance(largest, IndexSelector)
    assert largest.indices.tolist() == [2, 4, 7]
    assert smallest.indices.tolist() == [5, 1, 3]
    assert (largest.kind, smallest.kind) == ("weight_largest", "weight_smallest")
    np.testing.assert_array_equal(largest(torch.from_numpy(x)).numpy(), x[:, [2, 4, 7]])


def test_weight_selectors_default_to_the_papers_per_class_reading() -> None:
    """"the lowest or highest weights (in absolute value) for each output class": classes take turns."""
    x = _features(d=8)
    weight = np.zeros((6, 8))
    weight[0] = [3, -0.5, 1, 1, -6, 0.1, 2, -4]  # class 0: largest |w| at 4, smallest at 5
    weight[1] = [0, 0, -6, 0, 0, 0, 0, 0]  # class 1: largest at 2; the other classes tie (lowest index)
    largest = fit_selector("weight_largest", x, 3, head_weight=weight)
    smallest = fit_selector("weight_smallest", x, 3, head_weight=weight)
    assert largest.indices.tolist() == [4, 2, 0]  # summed would give [2, 4, 7]
    assert smallest.indices.tolist() == [5, 0, 1]
    # Every feature once, however many are asked for.
    every = fit_selector("weight_largest", x, 8, head_weight=weight)
    assert sorted(every.indices.tolist()) == list(range(8))
    with pytest.raises(ValueError, match="weight_reading"):
        fit_selector("weight_largest", x, 3, head_weight=weight, weight_reading="mean")


def test_std_selector_keeps_the_most_varying_features() -> None:
    rng = np.random.default_rng(3)
    scales = np.array([1.0, 5.0, 0.1, 3.0, 0.5, 4.0])
    x = (rng.normal(size=(500, 6)) * scales).astype(np.float32)
    selector = fit_selector("std", x, 2)
    assert selector.indices.tolist() == [1, 5]
    assert (selector.in_dim, selector.out_dim) == (6, 2)


@pytest.mark.parametrize("kind", ["pca", "weight_smallest", "weight_largest", "std"])
def test_empty_selector_filled_from_state_dict_matches_fitted(kind: str) -> None:
    x = _features()
    fitted = fit_selector(kind, x, 5, head_weight=np.random.default_rng(0).normal(size=(6, 24)))
    empty = build_selector(kind, 24, 5)
    assert (empty.kind, empty.in_dim, empty.out_dim) == (kind, 24, 5)
    empty.load_state_dict(fitted.state_dict())
    torch.testing.assert_close(empty(torch.from_numpy(x)), fitted(torch.from_numpy(x)))


def test_selector_errors() -> None:
    x = _features(n=4)
    with pytest.raises(ValueError, match="head"):
        fit_selector("weight_largest", x, 3)
    with pytest.raises(ValueError, match="unknown selector"):
        fit_selector("random", x, 3)
    with pytest.raises(ValueError, match="at least"):
        fit_selector("pca", x, 6)
    with pytest.raises(ValueError):
        fit_selector("std", x, 30)
