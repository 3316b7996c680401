"""Head and MLP-channel group maps discovered from a transformers config (erasus.tasks.groups): GPT-2 (fused qkv,
Conv1D stored transposed), Llama with grouped-query attention, a peft LoRA model, and models it cannot map."""
import peft
import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from erasus.errors import InvalidInputError
from erasus.tasks.groups import transformer_groups


def gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=24, n_head=3, n_inner=40, vocab_size=30, n_positions=16))


def llama(**extra):
    torch.manual_seed(0)
    config = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=30, max_position_embeddings=16)
    return LlamaForCausalLM(LlamaConfig(**{**config, **extra}))


def test_gpt2_heads_and_channels():
    groups = transformer_groups(gpt2())
    assert groups.n_groups == 2 * (3 + 40)
    head = 8  # 24 / 3
    c_attn = groups.modules["transformer.h.1.attn.c_attn"]
    start = groups.names.index("block1.head0")
    assert c_attn.axis == "rows" and c_attn.ids.shape == (72,)
    want = torch.arange(24) // head
    assert torch.equal(c_attn.ids - start, torch.cat([want, want, want]))  # q, k, v parts
    c_proj = groups.modules["transformer.h.1.attn.c_proj"]
    assert c_proj.axis == "columns" and torch.equal(c_proj.ids - start, want)
    fc, proj = groups.modules["transformer.h.0.mlp.c_fc"], groups.modules["transformer.h.0.mlp.c_proj"]
    channel0 = groups.names.index("block0.channel0")
    assert fc.axis == "rows" and proj.axis == "columns"
    assert torch.equal(fc.ids, torch.arange(40) + channel0) and torch.equal(proj.ids, fc.ids)
    assert set(groups.modules) == {f"transformer.h.{i}.{m}" for i in (0, 1)
                                   for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}


def test_llama_grouped_query_attention_keeps_each_kv_head_with_its_query_heads():
    groups = transformer_groups(llama())
    start = groups.names.index("block0.head0")
    head_dim = 8
    q = groups.modules["model.layers.0.self_attn.q_proj"].ids - start
    k = groups.modules["model.layers.0.self_attn.k_proj"].ids - start
    o = groups.modules["model.layers.0.self_attn.o_proj"]
    # 4 query heads read 2 key/value heads: query heads 0, 1 -> group 0; 2, 3 -> group 1
    assert q.tolist() == [h // 2 for h in range(4) for _ in range(head_dim)]
    assert k.tolist() == [h for h in range(2) for _ in range(head_dim)]
    assert o.axis == "columns" and torch.equal(o.ids - start, q)
    gate, up, down = (groups.modules[f"model.layers.1.mlp.{n}"] for n in ("gate_proj", "up_proj", "down_proj"))
    assert gate.axis == up.axis == "rows" and down.axis == "columns"
    assert torch.equal(gate.ids, up.ids) and torch.equal(up.ids, down.ids)
    assert groups.names[int(gate.ids[5])] == "block1.channel5"


def test_element_ids_tile_the_weight_in_its_logical_orientation():
    model = llama()
    groups = transformer_groups(model)
    o = groups.modules["model.layers.0.self_attn.o_proj"]
    weight = model.model.layers[0].self_attn.o_proj.weight
    ids = o.element_ids(*weight.shape)
    assert ids.shape == weight.shape and torch.equal(ids[:, 9], o.ids[9].expand(weight.shape[0]))


def test_a_peft_lora_model_maps_through_its_wrappers():
    model = peft.get_peft_model(llama(), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj", "down_proj"]))
    groups = transformer_groups(model)
    plain = transformer_groups(llama())
    prefix = "base_model.model."
    assert {prefix + n for n in plain.modules} == set(groups.modules)
    for name, value in plain.modules.items():
        assert value.axis == groups.modules[prefix + name].axis
        assert torch.equal(value.ids, groups.modules[prefix + name].ids)


class NoBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = LlamaConfig(hidden_size=8, num_attention_heads=2, num_hidden_layers=3)
        self.proj = nn.Linear(8, 8)


class Odd(nn.Module):
    """A config with heads, blocks whose attention projection has a shape no head layout explains."""

    def __init__(self):
        super().__init__()
        self.config = LlamaConfig(hidden_size=8, num_attention_heads=2, num_hidden_layers=1, intermediate_size=16)
        self.layers = nn.ModuleList([nn.ModuleDict({"attn": nn.Linear(8, 5)})])


@pytest.mark.parametrize("model, match", [
    (nn.Sequential(nn.Linear(2, 2)), "Sequential has no transformers config"),
    (NoBlocks(), "could not find the list of decoder blocks of NoBlocks"),
    (Odd(), r"Odd: layers.0.attn \(5 x 8\) matches no attention output projection layout"),
])
def test_a_model_it_cannot_map_is_named(model, match):
    with pytest.raises(InvalidInputError, match=match):
        transformer_groups(model)
