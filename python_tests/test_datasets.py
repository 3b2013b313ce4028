"""The digits data, the training loop, the encoders and the one accuracy
(spectral_ext.datasets, .training, .encoders, ._data; issue 17)."""
import pytest
import torch
from torch import nn

from spectral_ext import _data, datasets, encoders, training


def test_digits_split_is_fixed_by_default_and_follows_the_generator():
    a, b = datasets.digits(), datasets.digits()
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert a[0].shape == (1437, 1, 8, 8) and a[2].shape == (360, 1, 8, 8) and float(a[0].max()) <= 1.0
    seeded = datasets.digits(generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(u, v) for u, v in zip(seeded, datasets.digits(generator=3)))
    assert not torch.equal(seeded[1], a[1])
    with pytest.raises(ValueError, match="test_fraction"):
        datasets.digits(test_fraction=1.0)
    with pytest.raises(TypeError, match="generator"):
        datasets.digits(generator="zero")


def _trained(**kwargs):
    x, y = datasets.digits()[:2]
    torch.manual_seed(0)
    model = datasets.digits_mlp(width=16)
    return training.train(model, kwargs.pop("data", (x[:200], y[:200])), epochs=2, progress=False, **kwargs)


def _same_weights(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_train_is_deterministic_in_every_call_shape():
    x, y = datasets.digits()[:2]
    reference = _trained()
    assert not reference.training  # given back in eval mode, ready to measure
    assert _same_weights(reference, _trained(generator=0))
    assert _same_weights(reference, _trained(generator=torch.Generator().manual_seed(0)))
    torch.manual_seed(0)  # the former train(model, x, y) shape
    former = training.train(datasets.digits_mlp(width=16), x[:200], y[:200], epochs=2, progress=False)
    assert _same_weights(reference, former)
    assert not _same_weights(reference, _trained(generator=1))
    # None shuffles from torch's global generator: repeatable under torch.manual_seed
    assert _same_weights(_trained(generator=None), _trained(generator=None))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:200], y[:200]), batch_size=64)
    torch.manual_seed(0)
    initial = datasets.digits_mlp(width=16)
    from_loader = _trained(data=loader)  # a loader's own batches train too: 8 Adam steps lower the loss
    with torch.no_grad():
        losses = [float(nn.functional.cross_entropy(m(x[:200]), y[:200])) for m in (initial, from_loader)]
    assert losses[1] < losses[0] and not _same_weights(initial, from_loader)
    assert datasets.train is training.train
    with pytest.raises(ValueError, match="data must carry labels"):
        _trained(data=x[:200])
    with pytest.raises(ValueError, match="lr"):
        _trained(lr=0.0)


def test_one_accuracy_restores_the_mode_and_takes_any_data():
    x, y = datasets.digits()[2:]
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.Dropout(0.9)).train()
    expected = float((model[1](model[0](x)).argmax(1) == y).double().mean())
    assert datasets.accuracy is _data.accuracy
    assert _data.accuracy(model, (x, y)) == pytest.approx(expected)  # eval: dropout off
    assert model.training and model[2].training  # and given back as it came
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=50)
    assert _data.accuracy(model, loader) == pytest.approx(expected)
    assert _data.accuracy(lambda inputs: model[1](model[0](inputs)), (x, y)) == pytest.approx(expected)
    with pytest.raises(TypeError, match=r"accuracy\(model, \(x, y\)\)"):
        _data.accuracy(model, x, y)  # the former datasets.accuracy(model, x, y)
    with pytest.raises(TypeError, match="model must be a callable"):
        _data.accuracy("net", (x, y))
    with pytest.raises(ValueError, match="model does not accept inputs"):
        _data.accuracy(nn.Linear(3, 10), (x.flatten(1), y))
    with pytest.raises(ValueError, match="data labels must lie in"):
        _data.accuracy(model, (x, y + 10))
    with pytest.raises(ValueError, match="data must carry labels"):
        _data.accuracy(model, x)


def test_gather_returns_tensors_as_given_and_concatenates_loaders():
    x, y = torch.randn(10, 3), torch.arange(10)
    assert _data.gather(x)[0] is x and _data.gather(x)[1] is None
    pair = _data.gather((x, y), labels=True)
    assert pair[0] is x and pair[1] is y
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    gx, gy = _data.gather(loader, labels=True)
    assert torch.equal(gx, x) and torch.equal(gy, y)
    assert _data.gather([x[:4], x[4:]])[1] is None
    with pytest.raises(ValueError, match="data must carry labels"):
        _data.gather(x, labels=True)
    with pytest.raises(ValueError, match="features holds 10 inputs but labels"):
        _data.gather((x, y[:3]), name="features")
    with pytest.raises(ValueError, match="data holds no sample"):
        _data.gather(x[:0])


def test_encoders_live_in_their_own_module():
    assert datasets.BertEncoder is encoders.BertEncoder and datasets.minilm is encoders.minilm
    torch.manual_seed(0)
    model = encoders.BertEncoder(vocab_size=50, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=16, max_position_embeddings=12).eval()
    ids = torch.randint(0, 50, (3, 7))
    assert model(ids).shape == (3, 7, 8)
    names = {name for name, _ in model.named_parameters()}
    assert "encoder.layer.1.attention.self.query.weight" in names  # Hugging Face's BertModel names
    assert "embeddings.LayerNorm.weight" in names
