"""Every selector on a causal LM's forget set: tiny GPT-2, Llama and a peft-LoRA GPT-2, right-padded batches.

The oracles run each sample alone, unpadded, with plain autograd: a batched, padded computation that agrees
with them ignores the padding and gets the per-sample quantity right.
"""
import peft
import pytest
import torch
import transformers
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

import erasus.selectors.gradient as gradient
from erasus import errors
from erasus.selectors import (SELECTORS, EL2NSelector, FacilityLocationSelector, GradNormSelector, KCenterSelector,
                              extract_features, get_selector)
from erasus.selectors.features import pool_tokens
from erasus.selectors.gradient import last_layer_grad_gram_of

VOCAB, PAD = 60, 0


@pytest.fixture(autouse=True)
def one_torch_thread():
    """These models are tiny: a second intra-op thread only adds synchronisation, and on a busy 2-core machine
    spinning threads slow each op down by ~50x (measured: 15 s vs 0.3 s for one GraNd check)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class TokenQA(Dataset):
    """Items as erasus.data.QADataset gives them: varying lengths, -100 labels on the prompt, and a collate
    that right-pads (pad id / mask 0 / label -100). ``extra_padding`` appends padding to sample 0 itself."""

    def __init__(self, n=12, seed=0, extra_padding=0):
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for i in range(n):
            steps = int(torch.randint(4, 13, (1,), generator=g))
            prompt = int(torch.randint(1, steps - 1, (1,), generator=g))
            ids = torch.randint(1, VOCAB, (steps,), generator=g)
            labels = ids.clone()
            labels[:prompt] = -100
            item = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
            if i == 0 and extra_padding:
                item = {k: torch.cat([v, torch.full((extra_padding,), fill)])
                        for (k, v), fill in zip(item.items(), (PAD, 0, -100))}
            self.items.append(item)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]

    def collate(self, items):
        longest = max(len(it["input_ids"]) for it in items)
        fills = {"input_ids": PAD, "attention_mask": 0, "labels": -100}
        return {key: torch.stack([torch.cat([it[key], torch.full((longest - len(it[key]),), fill)]) for it in items])
                for key, fill in fills.items()}


def tiny_gpt2(bias_head=False):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=32,
                                  bos_token_id=0, eos_token_id=0, tie_word_embeddings=not bias_head)
    model = transformers.GPT2LMHeadModel(cfg)
    if bias_head:
        model.lm_head = nn.Linear(32, VOCAB, bias=True)
    return model.eval()


def tiny_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=48, num_attention_heads=2,
                                   num_key_value_heads=1, vocab_size=VOCAB, max_position_embeddings=32,
                                   bos_token_id=0, eos_token_id=0, pad_token_id=PAD)
    return transformers.LlamaForCausalLM(cfg).eval()


def lora_gpt2():
    model = peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"],
                                                             fan_in_fan_out=True, lora_dropout=0.1))
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero; move it so the A factors get gradients too
            nn.init.normal_(p, std=0.1)
    return model.eval()


MODELS = {"gpt2": tiny_gpt2, "llama": tiny_llama, "lora_gpt2": lora_gpt2}


def alone(item):
    """Sample i as a batch of one, without padding."""
    real = item["attention_mask"].bool()
    return {k: v[real].unsqueeze(0) for k, v in item.items()}


def token_mean_nll(logits, labels):
    logits, labels = logits[0, :-1], labels[0, 1:]
    counted = labels != -100
    return nn.functional.cross_entropy(logits[counted], labels[counted])


def forward_alone(model, item):
    batch = alone(item)
    return model(input_ids=batch["input_ids"], output_hidden_states=True), batch


def loop_grad_norms(model, data):
    params = [p for p in model.parameters() if p.requires_grad]
    norms = []
    for item in data:
        out, batch = forward_alone(model, item)
        grads = torch.autograd.grad(token_mean_nll(out.logits, batch["labels"]), params, allow_unused=True)
        norms.append(sum(float(g.double().square().sum()) for g in grads if g is not None) ** 0.5)
    return torch.tensor(norms, dtype=torch.float64)


def materialised_head_grads(model, data):
    """Per sample [dW, db] of the token-mean NLL with respect to lm_head's weight (and bias) alone."""
    head = model.get_output_embeddings()
    rows = []
    for item in data:
        with torch.no_grad():
            out, batch = forward_alone(model, item)
        weight = head.weight.detach().clone().requires_grad_()
        params = [weight]
        bias = None
        if head.bias is not None:
            bias = head.bias.detach().clone().requires_grad_()
            params.append(bias)
        logits = nn.functional.linear(out.hidden_states[-1], weight, bias)
        grads = torch.autograd.grad(token_mean_nll(logits, batch["labels"]), params)
        rows.append(torch.cat([g.flatten() for g in grads]).double())
    return torch.stack(rows)


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("selector_name", sorted(SELECTORS))
def test_every_selector_picks_k_distinct_indices_and_leaves_the_lm_untouched(selector_name, model_name):
    model = MODELS[model_name]()
    model.train()
    model.get_output_embeddings().eval()  # one part deliberately in eval mode: the flag must survive
    before = state(model)
    data = TokenQA(n=12)
    idx = get_selector(selector_name, batch_size=5).select(data, k=4, model=model)
    assert idx.dtype == torch.int64 and idx.shape == (4,) and idx.unique().numel() == 4
    assert 0 <= int(idx.min()) and int(idx.max()) < 12
    assert model.training and not model.get_output_embeddings().training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_a_subset_and_a_users_dataloader_are_batched_with_the_collate():
    model, data = tiny_gpt2(), TokenQA(n=12)
    subset = Subset(data, [3, 1, 4, 0, 5, 9, 2, 6])
    want = KCenterSelector().select(torch.stack([extract_features([data[i]], model=model)[0]
                                                 for i in subset.indices]), k=3)
    assert KCenterSelector(batch_size=3).select(subset, k=3, model=model).tolist() == want.tolist()
    loader = DataLoader(data, batch_size=4, collate_fn=data.collate)
    assert torch.equal(GradNormSelector().select(loader, k=3, model=model),
                       GradNormSelector().select(data, k=3, model=model))


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_pooled_features_ignore_padding(model_name, pooling):
    model = MODELS[model_name]()
    for source in ({}, {"hidden_layer": 1}):
        plain = extract_features(TokenQA(n=6), model=model, pooling=pooling, batch_size=6, **source)
        padded = extract_features(TokenQA(n=6, extra_padding=9), model=model, pooling=pooling, batch_size=6, **source)
        torch.testing.assert_close(padded, plain, rtol=1e-5, atol=1e-5)
    # and they are the mean (or last row) of the unpadded sample's final hidden state
    data = TokenQA(n=6)
    got = extract_features(data, model=model, pooling=pooling, batch_size=4)
    for i, item in enumerate(data):
        with torch.no_grad():
            states = forward_alone(model, item)[0].hidden_states[-1][0]
        torch.testing.assert_close(got[i], states.mean(0) if pooling == "mean" else states[-1], rtol=1e-5, atol=1e-5)


def test_pooling_uses_the_real_tokens_with_left_or_right_padding():
    torch.manual_seed(0)  # fixed data, whatever ran before
    f = torch.randn(3, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    torch.testing.assert_close(pool_tokens(f, mask, "last"), torch.stack([f[0, 2], f[1, 4], f[2, 4]]))
    torch.testing.assert_close(pool_tokens(f, mask, "mean"),
                               torch.stack([f[0, :3].mean(0), f[1, 2:].mean(0), f[2].mean(0)]))
    torch.testing.assert_close(pool_tokens(f, None, "mean"), f.mean(1))
    with pytest.raises(errors.ShapeError, match="attention_mask"):
        pool_tokens(f, mask[:, :4])


@pytest.mark.parametrize("model_name", ["gpt2", "lora_gpt2"])
def test_hidden_layer_picks_that_hidden_state(model_name):
    model = MODELS[model_name]()
    prefix = "base_model.model." if model_name == "lora_gpt2" else ""
    data = TokenQA(n=8)
    # 0: the embeddings, token + position, averaged over the real tokens
    gpt2 = model.get_base_model() if model_name == "lora_gpt2" else model
    want0 = torch.stack([(gpt2.transformer.wte(alone(it)["input_ids"][0]) +
                          gpt2.transformer.wpe(torch.arange(int(it["attention_mask"].sum())))).mean(0)
                         for it in data]).detach()
    torch.testing.assert_close(extract_features(data, model=model, hidden_layer=0, batch_size=3), want0)
    # 1: the output of block 0, i.e. the input of block 1
    torch.testing.assert_close(extract_features(data, model=model, hidden_layer=1, batch_size=3),
                               extract_features(data, model=model, layer=f"{prefix}transformer.h.1.ln_1"))
    # -1 and 2: the last, the input of lm_head (the default feature)
    default = extract_features(data, model=model)
    torch.testing.assert_close(extract_features(data, model=model, hidden_layer=-1), default)
    torch.testing.assert_close(extract_features(data, model=model, hidden_layer=2), default)
    assert not torch.allclose(default, extract_features(data, model=model, hidden_layer=1))
    idx = KCenterSelector(hidden_layer=1).select(data, k=3, model=model)
    assert idx.tolist() == KCenterSelector().select(
        extract_features(data, model=model, hidden_layer=1), k=3).tolist()


@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_gradnorm_model_scope_equals_a_per_sample_autograd_loop(model_name):
    model, data = MODELS[model_name](), TokenQA(n=10)
    sel = GradNormSelector(batch_size=4)
    idx = sel.select(data, k=4, model=model)
    want = loop_grad_norms(model, data)
    torch.testing.assert_close(sel.scores_.double(), want, rtol=1e-4, atol=1e-6)
    assert idx.tolist() == torch.argsort(want, descending=True)[:4].tolist()


@pytest.mark.parametrize("model_name", ["gpt2", "llama", "gpt2_bias_head"])
def test_last_layer_grad_norms_and_gram_equal_materialised_head_gradients(model_name, monkeypatch):
    model = tiny_gpt2(bias_head=True) if model_name == "gpt2_bias_head" else MODELS[model_name]()
    data = TokenQA(n=9, seed=2)
    grads = materialised_head_grads(model, data)
    sel = GradNormSelector(scope="last_layer", batch_size=4)
    idx = sel.select(data, k=3, model=model)
    torch.testing.assert_close(sel.scores_.double(), grads.norm(dim=1), rtol=1e-4, atol=1e-7)
    assert idx.tolist() == torch.argsort(grads.norm(dim=1), descending=True)[:3].tolist()
    monkeypatch.setattr(gradient, "_GRAM_BLOCK_ELEMENTS", 50)  # blocks of a few token rows
    gram = last_layer_grad_gram_of(data, model, batch_size=4)
    torch.testing.assert_close(gram.double(), grads @ grads.T, rtol=1e-4, atol=1e-7)


def test_el2n_is_the_mean_error_norm_over_the_label_tokens():
    model, data = tiny_llama(), TokenQA(n=10, seed=3)
    want = []
    for item in data:
        with torch.no_grad():
            out, batch = forward_alone(model, item)
        logits, labels = out.logits[0, :-1], batch["labels"][0, 1:]
        counted = labels != -100
        err = torch.softmax(logits[counted], -1) - nn.functional.one_hot(labels[counted], VOCAB)
        want.append(float(err.norm(dim=1).mean()))
    sel = EL2NSelector(batch_size=3)
    idx = sel.select(data, k=4, model=model)
    torch.testing.assert_close(sel.scores_.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    assert idx.tolist() == torch.argsort(torch.tensor(want), descending=True)[:4].tolist()


@pytest.mark.parametrize("model_name", ["gpt2", "lora_gpt2"])
def test_craig_on_an_lm_matches_a_greedy_oracle_on_materialised_gradients(model_name):
    model, data = MODELS[model_name](), TokenQA(n=10, seed=4)
    grads = materialised_head_grads(model, data)
    dist = torch.cdist(grads, grads)
    sim = dist.max() - dist
    chosen = []
    for _ in range(4):
        cover = sim[chosen].max(0).values if chosen else torch.zeros(10, dtype=torch.float64)
        gains = torch.tensor([float((sim[i] - cover).clamp(min=0).sum()) if i not in chosen else -1.0
                              for i in range(10)])
        chosen.append(int(torch.argmax(gains)))
    sel = FacilityLocationSelector(batch_size=4)
    assert sel.select(data, k=4, model=model).tolist() == chosen
    assert int(sel.weights_.sum()) == 10


def test_default_loss_of_an_lm_is_the_token_mean_nll():
    model, data = tiny_gpt2(), TokenQA(n=5)
    with torch.no_grad():
        got = gradient.default_loss(model, data.collate(data.items))
        want = torch.stack([token_mean_nll(forward_alone(model, it)[0].logits, alone(it)["labels"]) for it in data])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: KCenterSelector(hidden_layer=3).select(TokenQA(4), k=2, model=tiny_gpt2()),
         errors.InvalidInputError, "hidden_layer=3 is out of range"),
        (lambda: KCenterSelector(hidden_layer=1, layer="lm_head"), errors.InvalidInputError, "not both"),
        (lambda: KCenterSelector(hidden_layer="last"), errors.InvalidInputError, "hidden_layer must be an integer"),
        (lambda: KCenterSelector(pooling="max"), errors.InvalidInputError, "pooling must be"),
        (lambda: KCenterSelector(hidden_layer=-1, embed=lambda b: b), errors.InvalidInputError, "not both"),
        (lambda: KCenterSelector(hidden_layer=0).select(torch.randint(0, 5, (4, 3)), k=2,
                                                        model=nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 2))),
         errors.InvalidInputError, "output_hidden_states"),
        (lambda: EL2NSelector().select([{"input_ids": torch.tensor([1, 2]), "labels": torch.tensor([1, VOCAB])}],
                                       k=1, model=tiny_gpt2()),
         errors.InvalidInputError, "labels must be class indices"),
    ],
)
def test_bad_lm_input_gets_a_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_every_selector_runs_on_a_subset_of_erasus_qadataset():
    from erasus.data import QADataset, build_tokenizer, make_authors, qa_records
    from erasus.data.tofu import corpus_texts

    records = qa_records(make_authors(3, seed=0), per_author=4)
    tokenizer = build_tokenizer(corpus_texts(records))
    forget = Subset(QADataset(records, tokenizer), list(range(1, 12)))
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(tokenizer), n_positions=64)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    for name in sorted(SELECTORS):
        idx = get_selector(name, batch_size=4).select(forget, k=3, model=model)
        assert idx.shape == (3,) and idx.unique().numel() == 3 and 0 <= int(idx.min()) and int(idx.max()) < 11, name
