import peft
import pytest
import torch
import transformers
from torch import nn

import erasus.ops
from erasus import errors
from erasus.losses import per_sample_cross_entropy
from oracles import backends_for


def loop_norms(model, loss_fn, batch):
    """The definition: one gradient per sample of the batched losses, then its norm over trainable params."""
    params = [p for p in model.parameters() if p.requires_grad]
    losses = loss_fn(model, batch)
    out = []
    for i in range(losses.shape[0]):
        grads = torch.autograd.grad(losses[i], params, retain_graph=True, allow_unused=True)
        out.append(sum(float(g.double().square().sum()) for g in grads if g is not None))
    return torch.tensor(out, dtype=torch.float64).sqrt()


def ce(model, batch):
    return nn.functional.cross_entropy(model(batch[0]), batch[1], reduction="none")


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 5)).eval()


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, stride=2), nn.ReLU(), nn.Conv2d(4, 3, 2), nn.Flatten(),
                         nn.Linear(3 * 3 * 3, 4)).eval()


def tiny_gpt2(tied=True):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=40, n_positions=16,
                                  tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def tiny_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=16, intermediate_size=24, num_attention_heads=2,
                                   num_key_value_heads=1, vocab_size=40, max_position_embeddings=16,
                                   bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg).eval()


def lm_batch(batch=4, steps=7):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 40, (batch, steps), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # right padding on two samples
    mask[3, 3:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def lm_loss(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return per_sample_cross_entropy(logits, batch["labels"], shift=True, reduction="sum")


@pytest.mark.parametrize("backend", backends_for(("reference", "cpp")))
def test_classifier_mlp_and_cnn_match_the_per_sample_loop(backend):
    torch.manual_seed(0)  # fixed data, whatever ran before
    x, y = torch.randn(9, 12), torch.randint(0, 5, (9,))
    model = mlp()
    torch.testing.assert_close(erasus.ops.grad_norms(model, ce, (x, y), backend=backend).double(),
                               loop_norms(model, ce, (x, y)), rtol=1e-4, atol=1e-6)
    x, y = torch.randn(6, 2, 7, 7), torch.randint(0, 4, (6,))
    model = cnn()
    torch.testing.assert_close(erasus.ops.grad_norms(model, ce, (x, y), backend=backend).double(),
                               loop_norms(model, ce, (x, y)), rtol=1e-4, atol=1e-6)


def test_wide_convolutions_use_grouped_weight_gradients_and_match_the_loop():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(16, 8, 3, padding=1, stride=2, dilation=1), nn.ReLU(), nn.Flatten(1, 2),
                          nn.Conv1d(8 * 4, 5, 3, padding=2, dilation=2), nn.Flatten(), nn.Linear(5 * 4, 3)).eval()
    x, y = torch.randn(5, 16, 7, 8), torch.randint(0, 3, (5,))
    torch.testing.assert_close(erasus.ops.grad_norms(model, ce, (x, y)).double(), loop_norms(model, ce, (x, y)),
                               rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(erasus.ops.grad_norms(model, ce, (x, y), backend="cpp").double(),
                               loop_norms(model, ce, (x, y)), rtol=1e-4, atol=1e-6)


def test_conv1d_and_embedding_classifier():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Embedding(20, 6, padding_idx=0), Transpose(), nn.Conv1d(6, 5, 3, padding=1, stride=2),
                          nn.Flatten(), nn.Linear(5 * 5, 3)).eval()
    ids = torch.randint(0, 20, (5, 9))
    ids[:, 0] = 0
    ids[0, :4] = 7  # repeated token within a sample
    y = torch.randint(0, 3, (5,))
    torch.testing.assert_close(erasus.ops.grad_norms(model, ce, (ids, y)).double(), loop_norms(model, ce, (ids, y)),
                               rtol=1e-4, atol=1e-6)


class Transpose(nn.Module):
    def forward(self, x):
        return x.transpose(1, 2)


@pytest.mark.parametrize("tied", [True, False])
def test_gpt2_with_padding_matches_the_loop(tied):
    model = tiny_gpt2(tied)
    batch = lm_batch()
    torch.testing.assert_close(erasus.ops.grad_norms(model, lm_loss, batch).double(),
                               loop_norms(model, lm_loss, batch), rtol=1e-4, atol=1e-6)


def test_llama_full_and_lora_adapters_match_the_loop():
    model = tiny_llama()
    batch = lm_batch()
    torch.testing.assert_close(erasus.ops.grad_norms(model, lm_loss, batch).double(),
                               loop_norms(model, lm_loss, batch), rtol=1e-4, atol=1e-6)
    lora = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                             lora_dropout=0.0))
    for module in lora.modules():  # peft starts B at zero: move it so the A-factor gradients are not zero
        if hasattr(module, "lora_B"):
            nn.init.normal_(module.lora_B["default"].weight, std=0.1)
    lora.eval()
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    torch.testing.assert_close(erasus.ops.grad_norms(lora, lm_loss, batch).double(),
                               loop_norms(lora, lm_loss, batch), rtol=1e-4, atol=1e-6)


def test_model_grad_fields_mode_and_weights_are_left_alone():
    model = mlp().train()
    for p in model.parameters():
        p.grad = torch.full_like(p, 3.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    erasus.ops.grad_norms(model, ce, (torch.randn(4, 12), torch.randint(0, 5, (4,))))
    assert model.training
    assert all(torch.equal(p.grad, torch.full_like(p, 3.0)) for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_partly_frozen_model_counts_trainable_parameters_only_and_batch_of_one_works():
    model = mlp()
    model[0].requires_grad_(False)
    x, y = torch.randn(1, 12), torch.randint(0, 5, (1,))
    got = erasus.ops.grad_norms(model, ce, (x, y), squared=True)
    assert got.shape == (1,)
    torch.testing.assert_close(got.double(), loop_norms(model, ce, (x, y)).square(), rtol=1e-4, atol=1e-6)


def test_mixed_precision_autocast_is_computed_in_float32():
    model = mlp()
    x, y = torch.randn(5, 12), torch.randint(0, 5, (5,))

    def amp_loss(m, b):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return nn.functional.cross_entropy(m(b[0]).float(), b[1], reduction="none")

    torch.testing.assert_close(erasus.ops.grad_norms(model, amp_loss, (x, y)).double(),
                               loop_norms(model, amp_loss, (x, y)), rtol=3e-2, atol=1e-3)


class Reused(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(4, 4)

    def forward(self, x):
        return self.layer(self.layer(x))


@pytest.mark.parametrize(
    "model, loss_fn, batch, error, match",
    [
        (nn.Sequential(nn.Linear(4, 4), nn.PReLU()), lambda m, b: m(b).sum(1), torch.randn(3, 4),
         errors.UnsupportedLayerError, "layer 1 of type torch.nn.modules.activation.PReLU"),
        (mlp().requires_grad_(False), ce, (torch.randn(3, 12), torch.zeros(3, dtype=torch.long)),
         errors.InvalidInputError, "frozen"),
        (mlp(), lambda m, b: ce(m, b).mean(), (torch.randn(3, 12), torch.zeros(3, dtype=torch.long)),
         errors.ShapeError, "one loss per sample"),
        (mlp(), lambda m, b: ce(m, b) * float("nan"), (torch.randn(3, 12), torch.zeros(3, dtype=torch.long)),
         errors.NonFiniteError, "NaN or infinite losses"),
        (mlp(), lambda m, b: torch.sqrt(m(b[0]).sum(1) * 0), (torch.randn(3, 12), None),
         errors.NonFiniteError, "gradient at the output of layer"),
        (nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).train(), lambda m, b: m(b).sum(1), torch.randn(3, 4),
         errors.InvalidInputError, "BatchNorm in training mode"),
        (Reused(), lambda m, b: m(b).sum(1), torch.randn(3, 4), errors.InvalidInputError, "more than once"),
    ],
)
def test_bad_models_and_losses_get_a_clear_error(model, loss_fn, batch, error, match):
    grads_before = [p.grad for p in model.parameters()]
    with pytest.raises(error, match=match):
        erasus.ops.grad_norms(model, loss_fn, batch)
    assert [p.grad for p in model.parameters()] == grads_before
    assert all(not m._forward_hooks for m in model.modules())
