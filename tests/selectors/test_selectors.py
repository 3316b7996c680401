import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import erasus.ops
from erasus import errors
from erasus.selectors import (SELECTORS, EL2NSelector, FacilityLocationSelector, GradNormSelector,
                              HerdingSelector, KCenterSelector, KMeansSelector, RandomSelector, Selector,
                              extract_features, get_selector)

FEATURE_SELECTORS = ["random", "kcenter", "herding", "kmeans"]


def classifier():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


def dataset(n=40):
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g))


def test_registry_is_filled_by_the_classes():
    assert SELECTORS == {"random": RandomSelector, "kcenter": KCenterSelector, "herding": HerdingSelector,
                         "kmeans": KMeansSelector, "gradnorm": GradNormSelector, "el2n": EL2NSelector,
                         "craig": FacilityLocationSelector}
    assert isinstance(get_selector("kcenter", metric="cosine"), KCenterSelector)
    assert get_selector("kcenter", metric="cosine").metric == "cosine"
    with pytest.raises(errors.InvalidInputError, match="unknown selector 'glister'"):
        get_selector("glister")
    with pytest.raises(errors.InvalidInputError, match="already registered"):
        type("Again", (Selector,), {"select": lambda self, data, k=None, ratio=None, model=None: None}, name="random")


@pytest.mark.parametrize("name", FEATURE_SELECTORS)
def test_each_selector_returns_k_distinct_indices_from_features(name):
    torch.manual_seed(0)  # fixed data, whatever ran before
    x = torch.randn(50, 6)
    idx = get_selector(name).select(x, k=7)
    assert idx.dtype == torch.int64 and idx.shape == (7,) and idx.unique().numel() == 7
    assert int(idx.min()) >= 0 and int(idx.max()) < 50
    assert get_selector(name).select(x, ratio=0.1).shape == (5,)
    assert get_selector(name).select(x, ratio=1.0).sort().values.tolist() == list(range(50))


def test_feature_selectors_equal_their_ops():
    torch.manual_seed(0)  # fixed data, whatever ran before
    x = torch.randn(60, 5)
    assert torch.equal(KCenterSelector().select(x, k=6), erasus.ops.kcenter_greedy(x, 6).indices)
    assert torch.equal(HerdingSelector().select(x, k=6), erasus.ops.herding(x, 6))
    assert torch.equal(KMeansSelector(seed=2).select(x, k=6), erasus.ops.kmeans_coreset(x, 6, seed=2))
    assert KCenterSelector(init="random", seed=3).select(x, k=2)[0] == torch.randint(
        60, (1,), generator=torch.Generator().manual_seed(3))[0]


def test_random_selector_is_seeded_and_needs_no_model():
    ds = dataset()
    a = RandomSelector(seed=4).select(ds, k=5)
    assert torch.equal(a, RandomSelector(seed=4).select(ds, k=5))
    assert not torch.equal(a, RandomSelector(seed=5).select(ds, k=5))


def test_model_features_are_the_penultimate_activations():
    model, ds = classifier(), dataset()
    inputs = ds.tensors[0]
    want = torch.relu(model[0](inputs)).detach()
    torch.testing.assert_close(extract_features(ds, model=model, batch_size=7), want)
    loader = DataLoader(ds, batch_size=9, shuffle=False)
    torch.testing.assert_close(extract_features(loader, model=model), want)
    torch.testing.assert_close(extract_features(inputs, model=model), want)
    torch.testing.assert_close(extract_features(ds, model=model, layer="0"), inputs)
    idx = KCenterSelector().select(ds, k=5, model=model)
    assert torch.equal(idx, erasus.ops.kcenter_greedy(want, 5).indices)


def test_extraction_leaves_the_model_as_it_was():
    model, ds = classifier(), dataset()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    HerdingSelector().select(ds, k=4, model=model)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model[2]._forward_hooks  # hook removed


def test_embed_function_and_dict_batches():
    torch.manual_seed(0)  # fixed data, whatever ran before
    class DictData(Dataset):
        def __init__(self):
            self.x = torch.randn(30, 4)

        def __len__(self):
            return 30

        def __getitem__(self, i):
            return {"input_ids": self.x[i], "labels": torch.tensor(0)}

    class KwargModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head = nn.Linear(4, 6), nn.Linear(6, 2)

        def forward(self, input_ids):
            return self.head(self.body(input_ids))

    data, model = DictData(), KwargModel()
    torch.testing.assert_close(extract_features(data, model=model), model.body(data.x).detach())
    sel = KCenterSelector(embed=lambda batch: batch["input_ids"] * 2)
    assert torch.equal(sel.select(data, k=3), erasus.ops.kcenter_greedy(data.x * 2, 3).indices)


def test_token_features_are_mean_pooled():
    torch.manual_seed(0)  # fixed data, whatever ran before
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 3))
    ids = torch.randint(0, 10, (6, 5))
    torch.testing.assert_close(extract_features(ids, model=model), model[0](ids).mean(dim=1).detach())


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: KCenterSelector().select(torch.randn(10, 3), k=2, ratio=0.5), errors.InvalidInputError,
         "exactly one of k"),
        (lambda: KCenterSelector().select(torch.randn(10, 3)), errors.InvalidInputError, "exactly one of k"),
        (lambda: KCenterSelector().select(torch.randn(10, 3), ratio=0.0), errors.InvalidInputError, "ratio must"),
        (lambda: KCenterSelector().select(torch.randn(10, 3), ratio=1.5), errors.InvalidInputError, "ratio must"),
        (lambda: KCenterSelector().select(torch.randn(10, 3), k=11), errors.InvalidInputError, "k must be"),
        (lambda: RandomSelector().select(torch.randn(10, 3), k=0), errors.InvalidInputError, "k must be"),
        (lambda: KCenterSelector().select(torch.randn(10, 3, 2), k=2), errors.ShapeError, "must be 2-D"),
        (lambda: KCenterSelector().select(torch.empty(0, 3), k=1), errors.EmptyInputError, "no samples"),
        (lambda: RandomSelector().select(TensorDataset(torch.empty(0, 3)), k=1), errors.EmptyInputError,
         "no samples"),
        (lambda: KCenterSelector().select(dataset(), k=2), errors.InvalidInputError, "needs a model or an embed"),
        (lambda: KCenterSelector().select(DataLoader(dataset(), shuffle=True), k=2, model=classifier()),
         errors.InvalidInputError, "shuffle"),
        (lambda: KCenterSelector(layer="nope").select(dataset(), k=2, model=classifier()),
         errors.InvalidInputError, "layer 'nope'"),
        (lambda: KCenterSelector().select(dataset(), k=2, model=nn.Sequential(nn.ReLU())),
         errors.InvalidInputError, "no nn.Linear"),
        (lambda: KCenterSelector().select(torch.full((4, 2), float("nan")), k=2), errors.NonFiniteError, "NaN"),
    ],
)
def test_bad_input_gets_a_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call()
