"""The BiLSTM head and the whole network: variable lengths, packing, concatenation, max over slices."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ihd_node.model.network import IhdModel
from ihd_node.model.preprocess import prepare_slices
from ihd_node.model.presets import tiny_config
from ihd_node.model.selection import fit_selector
from ihd_node.model.sequence import SequenceHead


def _head(**kw) -> SequenceHead:
    torch.manual_seed(0)
    args = dict(in_dim=5, hidden=7, layers=2, bidirectional=True, dropout=0.3, concat_cnn_probs=True)
    args.update(kw)
    return SequenceHead(**args).eval()


def test_any_number_of_slices() -> None:
    head = _head()
    for t in (1, 2, 17):
        out = head(torch.randn(3, t, 5), torch.rand(3, t, 6))
        assert out.shape == (3, t, 6)


def test_padding_does_not_leak_into_real_steps() -> None:
    head = _head()
    a, b = torch.randn(6, 5), torch.randn(3, 5)
    pa, pb = torch.rand(6, 6), torch.rand(3, 6)
    feats = torch.full((2, 6, 5), 1e3)  # loud padding: any leak would show
    probs = torch.ones(2, 6, 6)
    feats[0], feats[1, :3] = a, b
    probs[0], probs[1, :3] = pa, pb
    with torch.no_grad():
        batched = head(feats, probs, lengths=torch.tensor([6, 3]))
        alone_a = head(a[None], pa[None])[0]
        alone_b = head(b[None], pb[None])[0]
    torch.testing.assert_close(batched[0], alone_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batched[1, :3], alone_b, atol=1e-5, rtol=1e-5)


def test_cnn_probabilities_reach_the_classifier_only_when_concatenated() -> None:
    with_probs, without = _head(), _head(concat_cnn_probs=False, bidirectional=False, layers=1)
    assert with_probs.classifier.in_features == 2 * 7 + 6
    assert without.classifier.in_features == 7
    x = torch.randn(1, 4, 5)
    with torch.no_grad():
        assert not torch.allclose(with_probs(x, torch.zeros(1, 4, 6)), with_probs(x, torch.ones(1, 4, 6)))
        torch.testing.assert_close(without(x, torch.zeros(1, 4, 6)), without(x, torch.ones(1, 4, 6)))


def test_model_forward_is_cnn_then_selector_then_sequence() -> None:
    torch.manual_seed(0)
    model = IhdModel(tiny_config()).eval()
    torch.nn.init.normal_(model.selector.components)
    x = prepare_slices(np.random.default_rng(0).uniform(-100, 200, (5, 64, 64)).astype(np.float32), 64)
    with torch.no_grad():
        logits = model(x)
        cnn_logits, feats = model.forward_features(x)
        manual = model.sequence(model.selector(feats)[None], torch.sigmoid(cnn_logits)[None])[0]
    assert logits.shape == (5, 6)
    torch.testing.assert_close(logits, manual)
    probs = torch.sigmoid(logits)
    torch.testing.assert_close(IhdModel.series_probabilities(probs), probs.max(dim=0).values)
    np.testing.assert_array_equal(IhdModel.series_probabilities(probs.numpy()), probs.numpy().max(axis=0))


def test_set_selector_checks_shapes() -> None:
    model = IhdModel(tiny_config())
    fitted = fit_selector("pca", np.random.default_rng(0).normal(size=(40, 512)), 8)
    model.set_selector(fitted)
    assert model.selector is fitted
    with pytest.raises(ValueError, match="does not match"):
        model.set_selector(fit_selector("std", np.random.default_rng(0).normal(size=(40, 512)), 8))
