"""The causal-LM unlearning metrics (erasus.metrics.lm) against direct computations: per-sample loops over the
model, hand-worked examples, and test doubles whose logits or generations are crafted."""
import math

import peft
import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn
from torch.utils.data import Subset

from erasus import errors
from erasus.data import QADataset, TextDataset, build_tokenizer, tofu_splits
from erasus.data.tofu import corpus_texts
from erasus.metrics import lm

# Words of the hand-made records below, so the tokenizer knows them.
HAND_WORDS = ["q1 q2 q3 q4 a b c d e f g h i j k l m n o p"]


@pytest.fixture(scope="module")
def splits():
    return tofu_splits(n_authors=4, forget=0.25, per_author=3)


@pytest.fixture(scope="module")
def tokenizer(splits):
    return build_tokenizer(corpus_texts(sum(splits.values(), [])) + HAND_WORDS)


@pytest.fixture(scope="module")
def data(splits, tokenizer):
    return {name: QADataset(records, tokenizer) for name, records in splits.items()}


def tiny_gpt2(tokenizer, *, tied=True, dropout=0.0):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(tokenizer), n_positions=64,
                                  tie_word_embeddings=tied, resid_pdrop=dropout, embd_pdrop=dropout,
                                  attn_pdrop=dropout, pad_token_id=tokenizer.pad_token_id,
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return transformers.GPT2LMHeadModel(cfg).eval()


def tiny_llama(tokenizer):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=48, num_attention_heads=2,
                                   num_key_value_heads=1, vocab_size=len(tokenizer), max_position_embeddings=64,
                                   pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                                   eos_token_id=tokenizer.eos_token_id)
    return transformers.LlamaForCausalLM(cfg).eval()


def lora_gpt2(tokenizer):
    # GPT-2's c_attn is a Conv1D, whose weight is stored transposed: fan_in_fan_out=True says so to peft.
    model = peft.get_peft_model(tiny_gpt2(tokenizer), peft.LoraConfig(target_modules=["c_attn"], r=4,
                                                                      lora_dropout=0.0, fan_in_fan_out=True))
    torch.manual_seed(1)
    for module in model.modules():  # peft starts B at zero: move it so the A-factor gradients are not zero
        if hasattr(module, "lora_B"):
            nn.init.normal_(module.lora_B["default"].weight, std=0.1)
    return model.eval()


# ---------------------------------------------------------------------------------------------- direct oracles
def sample_logits(model, ds, i):
    """Logits of sample i run alone (no padding): (T, V)."""
    with torch.no_grad():
        return model(input_ids=ds[i]["input_ids"][None]).logits[0].float()


def manual_answer_logprobs(model, ds, i, *, with_eos):
    """log p of each answer token (and of the eos if ``with_eos``), read off the unpadded sample by position."""
    logits = sample_logits(model, ds, i)
    ids = ds[i]["input_ids"]
    start = len(ds.prompt_ids(i))
    stop = start + len(ds.answer_ids(i)) + (1 if with_eos else 0)
    return torch.stack([F.log_softmax(logits[t - 1], dim=-1)[ids[t]] for t in range(start, stop)])


def manual_greedy(model, prompt, budget, eos):
    """Token-by-token argmax, one sample, no cache, no padding, stopping at eos (left out)."""
    ids = list(prompt)
    out = []
    for _ in range(budget):
        with torch.no_grad():
            nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        if nxt == eos:
            break
        out.append(nxt)
        ids.append(nxt)
    return out


# ---------------------------------------------------------------------------------------------- likelihood
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_answer_nll_and_perplexity_match_a_per_sample_loop(data, tokenizer, arch):
    model = tiny_gpt2(tokenizer) if arch == "gpt2" else tiny_llama(tokenizer)
    ds = data["retain"]                       # 9 samples of different lengths: batches of 4 are padded
    expected = torch.stack([-manual_answer_logprobs(model, ds, i, with_eos=True).mean() for i in range(len(ds))])
    nll = lm.answer_nll(model, ds, batch_size=4)
    assert nll.shape == (len(ds),) and nll.device.type == "cpu"
    torch.testing.assert_close(nll, expected, rtol=1e-5, atol=1e-5)
    assert lm.perplexity(model, ds, batch_size=4) == pytest.approx(math.exp(float(expected.double().mean())),
                                                                   rel=1e-5)
    logprobs = lm.token_logprobs(model, ds, batch_size=4)
    for i, lp in enumerate(logprobs):  # the answer's tokens, eos left out
        assert lp.shape == (len(ds.answer_ids(i)),)
        torch.testing.assert_close(lp, manual_answer_logprobs(model, ds, i, with_eos=False), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lm.mia_loss(model, ds), nll)


def test_answer_labels_drop_only_a_trailing_eos():
    labels = torch.tensor([[-100, 5, 6, 2, -100], [-100, -100, 5, 6, 7], [-100, -100, -100, -100, -100]])
    assert lm.answer_labels(labels, 2).tolist() == [[-100, 5, 6, -100, -100], [-100, -100, 5, 6, 7],
                                                    [-100] * 5]
    assert lm.answer_labels(labels, None) is labels


# ---------------------------------------------------------------------------------------------- ROUGE
def test_rouge_l_recall_on_hand_examples():
    assert lm.rouge_l_recall("a b c d".split(), "a c d e".split()) == pytest.approx(3 / 4)   # LCS a c d
    assert lm.rouge_l_recall("c b a".split(), "a b c".split()) == pytest.approx(1 / 3)       # order matters
    assert lm.rouge_l_recall("x a y b z".split(), "a b".split()) == 1.0                      # recall: extras free
    assert lm.rouge_l_recall("a b".split(), "a x b y".split()) == pytest.approx(2 / 4)
    assert lm.rouge_l_recall([], "a b".split()) == 0.0                                       # empty prediction
    assert lm.rouge_l_recall("a".split(), []) == 0.0
    assert lm.rouge_tokenize("Daven Quinmont, born in 1951!") == ["daven", "quinmont", "born", "in", "1951"]


# ---------------------------------------------------------------------------------------------- crafted logits
class BigramLM(nn.Module):
    """Test double: the logits at position t are row ``x_t`` of a fixed table (a bigram model), so every
    next-token distribution -- and its argmax -- is set by hand. Returns HF-style ``.logits``."""

    def __init__(self, table):
        super().__init__()
        self.table = nn.Parameter(table.clone())

    def forward(self, input_ids, attention_mask=None):
        return transformers.modeling_outputs.CausalLMOutput(logits=self.table[input_ids])


def hand_dataset(tokenizer, answers):
    return QADataset([{"question": f"q{i + 1}", "answer": a} for i, a in enumerate(answers)], tokenizer)


def test_extraction_strength_on_controlled_argmax(tokenizer):
    ds = hand_dataset(tokenizer, ["x a b c d", "x e f g", "x h i"])
    tid = tokenizer.convert_tokens_to_ids
    table = torch.zeros(len(tokenizer), len(tokenizer))

    def predict(after, token):
        table[tid(after)] = 0.0
        table[tid(after), tid(token)] = 5.0

    predict(":", "x")                        # every answer starts with x, predicted from "Answer :"
    predict("x", "a")                        # right for sample 0, wrong for 1 and 2 (their second token differs)
    predict("a", "o")                        # sample 0: b mispredicted
    predict("b", "c"), predict("c", "d")     # ... then c, d right: suffix from k = 3 matches, ES = 1 - 3/5
    predict("e", "f"), predict("f", "p")     # sample 1: last token g mispredicted: no suffix matches, ES = 0
    predict("h", "i")                        # sample 2: only "h" (index 1) wrong: k = 2 of 3, ES = 1/3
    es = lm.extraction_strength(BigramLM(table), ds, batch_size=2)
    torch.testing.assert_close(es, torch.tensor([1 - 3 / 5, 0.0, 1 - 2 / 3]))
    predict("x", "h")                        # now sample 2 is predicted entirely: ES = 1
    assert float(lm.extraction_strength(BigramLM(table), ds)[2]) == 1.0


def test_min_k_and_min_k_plus_plus_match_the_per_token_formula(tokenizer):
    ds = hand_dataset(tokenizer, ["a b c d e f g", "h i", "j k l m"])
    torch.manual_seed(0)
    table = torch.randn(len(tokenizer), len(tokenizer)) * 3
    table[:, 5] = -float("inf")               # a token of probability 0 must not poison mu / sigma
    model = BigramLM(table)
    for k in (0.2, 0.4, 1.0):
        expected_min_k, expected_plus = [], []
        for i in range(len(ds)):
            ids = ds[i]["input_ids"].tolist()
            start, n = len(ds.prompt_ids(i)), len(ds.answer_ids(i))
            lps, zs = [], []
            for t in range(start, start + n):
                probs = torch.softmax(table[ids[t - 1]].double(), dim=0)
                logp = {v: math.log(float(p)) for v, p in enumerate(probs) if p > 0}
                mu = sum(float(probs[v]) * logp[v] for v in logp)
                var = sum(float(probs[v]) * (logp[v] - mu) ** 2 for v in logp)
                lps.append(logp[ids[t]])
                zs.append((logp[ids[t]] - mu) / math.sqrt(max(var, 1e-6)))
            count = max(1, int(n * k))
            expected_min_k.append(-sum(sorted(lps)[:count]) / count)
            expected_plus.append(-sum(sorted(zs)[:count]) / count)
        torch.testing.assert_close(lm.mia_min_k(model, ds, k=k, batch_size=2).double(),
                                   torch.tensor(expected_min_k, dtype=torch.float64), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(lm.mia_min_k_plus_plus(model, ds, k=k, batch_size=2).double(),
                                   torch.tensor(expected_plus, dtype=torch.float64), rtol=1e-4, atol=1e-5)


def test_zlib_score_is_nll_over_compressed_answer_length(data, tokenizer):
    import zlib

    model = tiny_gpt2(tokenizer)
    ds = data["forget"]
    sizes = torch.tensor([len(zlib.compress(ds.answer_text(i).encode())) for i in range(len(ds))], dtype=torch.float32)
    torch.testing.assert_close(lm.mia_zlib(model, ds), lm.answer_nll(model, ds) / sizes)


# ---------------------------------------------------------------------------------------------- truth ratio
def test_truth_ratio_matches_a_manual_computation(tokenizer, splits):
    records = [dict(r) for r in splits["forget"]]
    records[1]["perturbed_answers"] = records[1]["perturbed_answers"][:1]   # items may have fewer perturbed
    ds = QADataset(records, tokenizer)
    model = tiny_llama(tokenizer)

    def nll(question, answer):
        single = QADataset([{"question": question, "answer": answer}], tokenizer)
        return float(-manual_answer_logprobs(model, single, 0, with_eos=True).mean())

    expected = []
    for r in records:
        p_para = math.exp(-nll(r["question"], r["paraphrased_answer"]))
        pert = [nll(r["question"], a) for a in r["perturbed_answers"]]
        p_pert = math.exp(-sum(pert) / len(pert))           # OU: average the NLLs, then exponentiate
        expected.append(p_pert / p_para)
    tr = lm.truth_ratio(model, ds, batch_size=2)
    torch.testing.assert_close(tr, torch.tensor(expected, dtype=torch.float64), rtol=1e-4, atol=0)
    # A Subset is scored through its root dataset.
    torch.testing.assert_close(lm.truth_ratio(model, Subset(ds, [2, 0])), tr[[2, 0]], rtol=1e-5, atol=0)


def test_truth_ratio_aggregators_and_forget_quality():
    tr = torch.tensor([0.5, 2.0, 1.0])
    assert lm.truth_ratio_forget_score(tr) == pytest.approx((0.5 + 0.5 + 1.0) / 3)
    assert lm.truth_ratio_retain_score(tr) == pytest.approx(0.5 / 3)
    assert lm.truth_ratio_forget_score(torch.tensor([0.0])) == 0.0
    g = torch.Generator().manual_seed(0)
    reference = torch.rand(40, generator=g) + 0.5
    assert lm.forget_quality(reference, reference) == pytest.approx(1.0)
    assert lm.forget_quality(reference + 5.0, reference) < 1e-6


# ---------------------------------------------------------------------------------------------- AUC, privleak
def test_mia_auc_follows_open_unlearnings_labels_and_privleak_sign():
    assert lm.mia_auc([0.1, 0.2, 0.3], [0.5, 0.6]) == 1.0     # forget scores lower (members): AUC 1
    assert lm.mia_auc([0.5, 0.6], [0.1, 0.2, 0.3]) == 0.0
    assert lm.mia_auc([0.4, 0.4], [0.4, 0.4, 0.4]) == 0.5     # indistinguishable
    assert lm.mia_auc(torch.tensor([0.1, 0.5]), torch.tensor([0.3, 0.7])) == pytest.approx(0.75)
    assert lm.privleak(1.0) == pytest.approx(-100.0)           # under-unlearned: negative
    assert lm.privleak(0.5) == pytest.approx(0.0)
    assert lm.privleak(0.2) == pytest.approx(60.0)             # over-unlearned: positive
    assert lm.privleak(0.8, auc_retrained=0.6) == pytest.approx(((1 - 0.8) - 0.4) / 0.4 * 100)


# ---------------------------------------------------------------------------------------------- GradNorm
@pytest.mark.parametrize("arch", ["gpt2", "gpt2_untied", "llama", "lora"])
def test_gradnorm_matches_the_per_sample_loop(data, tokenizer, arch):
    model = {"gpt2": lambda: tiny_gpt2(tokenizer), "gpt2_untied": lambda: tiny_gpt2(tokenizer, tied=False),
             "llama": lambda: tiny_llama(tokenizer), "lora": lambda: lora_gpt2(tokenizer)}[arch]()
    if arch == "lora":
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable and all("lora_" in n for n in trainable)
    ds = data["retain"]
    fast = lm.mia_gradnorm(model, ds, batch_size=4)           # padded batches of 4, 4 and 1
    assert fast.shape == (len(ds),) and bool((fast > 0).all())
    torch.testing.assert_close(fast, lm.per_sample_loop_gradnorm(model, ds), rtol=1e-4, atol=1e-6)


def test_loop_gradnorm_is_the_norm_of_the_answer_token_mean_nll(data, tokenizer):
    model = tiny_gpt2(tokenizer)
    ds = data["forget"]
    params = [p for p in model.parameters() if p.requires_grad]
    expected = []
    for i in range(len(ds)):
        logits = model(input_ids=ds[i]["input_ids"][None]).logits[0]
        ids = ds[i]["input_ids"]
        start = len(ds.prompt_ids(i))
        positions = range(start, start + len(ds.answer_ids(i)))          # eos left out, as OU
        loss = -torch.stack([F.log_softmax(logits[t - 1], -1)[ids[t]] for t in positions]).mean()
        grads = torch.autograd.grad(loss, params)
        expected.append(math.sqrt(sum(float(g.double().square().sum()) for g in grads)))
    torch.testing.assert_close(lm.per_sample_loop_gradnorm(model, ds), torch.tensor(expected, dtype=torch.float32),
                               rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------- generation
@pytest.mark.parametrize("arch", ["gpt2", "llama", "lora"])
def test_greedy_answers_equal_a_token_by_token_argmax_loop(data, tokenizer, arch):
    model = {"gpt2": lambda: tiny_gpt2(tokenizer, tied=False), "llama": lambda: tiny_llama(tokenizer),
             "lora": lambda: lora_gpt2(tokenizer)}[arch]()
    ds = data["forget"]
    eos = tokenizer.eos_token_id
    got = lm.greedy_answers(model, ds, batch_size=3)          # prompts of different lengths, left-padded
    assert got == [manual_greedy(model, ds.prompt_ids(i).tolist(), len(ds.answer_ids(i)) + 1, eos)
                   for i in range(len(ds))]
    assert lm.greedy_answers(model, ds, max_new_tokens=4, batch_size=2) == [
        manual_greedy(model, ds.prompt_ids(i).tolist(), 4, eos) for i in range(len(ds))]


def test_generation_never_runs_past_the_context(tokenizer):
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=len(tokenizer), n_positions=12,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    # Prompts of 4 and 7 tokens with answers of 1 and 4 tokens: each fits 12 alone, not padded together.
    ds = QADataset([{"question": "q1 a b c", "answer": "d"}, {"question": "q2", "answer": "e f g h"}], tokenizer)
    got = lm.greedy_answers(model, ds, max_new_tokens=20)
    eos = tokenizer.eos_token_id
    assert got == [manual_greedy(model, ds.prompt_ids(i).tolist(), 12 - len(ds.prompt_ids(i)), eos)
                   for i in range(len(ds))]


class ScriptedLM(nn.Module):
    """Test double for the generation metrics: ``generate`` continues each (left-padded) context with a scripted
    token list keyed by the context, then pads; ``forward`` gives uniform logits. Records the contexts it saw."""

    def __init__(self, script, pad):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.script, self.pad, self.seen = script, pad, []

    def forward(self, input_ids, attention_mask=None):
        return transformers.modeling_outputs.CausalLMOutput(logits=torch.zeros(*input_ids.shape, 8))

    def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            context = tuple(ids[mask.bool()].tolist())
            self.seen.append(context)
            new = (list(self.script[context]) + [self.pad] * max_new_tokens)[:max_new_tokens]
            rows.append(torch.cat([ids, torch.tensor(new)]))
        return torch.stack(rows)


def test_qa_accuracy_rouge_and_verbatim_on_scripted_generations(tokenizer):
    ds = hand_dataset(tokenizer, ["a b c", "d e f", "g h i j", "k l"])
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
    prompt = lambda i: tuple(ds.prompt_ids(i).tolist())
    model = ScriptedLM({prompt(0): ids("a b c") + [eos, *ids("m m")],   # exact, then stops: correct
                        prompt(1): ids("d e f g"),                     # right words, does not stop: wrong
                        prompt(2): ids("g x i") + [eos],               # 2 of 4 words in order
                        prompt(3): [eos]}, pad)                        # empty answer
    assert lm.greedy_answers(model, ds, batch_size=3) == [ids("a b c"), ids("d e f g"), ids("g x i"), []]
    assert lm.qa_accuracy(model, ds, batch_size=3) == pytest.approx(1 / 4)
    assert lm.qa_rouge(model, ds) == pytest.approx((1.0 + 1.0 + 2 / 4 + 0.0) / 4)
    # Verbatim: the prompt plus the first half of the answer goes in, the rest is scored.
    contexts = {prompt(i) + tuple(ds.answer_ids(i).tolist()[:cut]): rest
                for i, cut, rest in [(0, 1, ids("b c")), (1, 1, ids("e o")), (2, 2, ids("i j")), (3, 1, ids("m"))]}
    model = ScriptedLM(contexts, pad)
    assert lm.verbatim_rouge(model, ds, prefix_fraction=0.5) == pytest.approx((1.0 + 0.5 + 1.0 + 0.0) / 4)
    assert set(model.seen) == set(contexts)
    # Plain text (MUSE's verbatim setting): the text after its first token is the part that is cut and scored.
    text = TextDataset(["a b c d", "e f"], tokenizer)
    bos = tokenizer.bos_token_id
    model = ScriptedLM({(bos, *ids("a b")): ids("c d") + [eos], (bos, *ids("e")): ids("x")}, pad)
    assert lm.verbatim_rouge(model, text) == pytest.approx((1.0 + 0.0) / 2)


# ---------------------------------------------------------------------------------------------- everything
def test_evaluate_lm_keys_consistency_and_forget_quality(data, tokenizer):
    model = tiny_gpt2(tokenizer, tied=False)
    forget, retain = Subset(data["forget"], [2, 0, 1]), Subset(data["retain"], [0, 4, 8])
    metrics, raw = lm.evaluate_lm(model, forget, retain, data["holdout"], return_raw=True)
    expected = {"forget_nll", "retain_nll", "holdout_nll", "forget_ppl", "retain_ppl", "forget_qa_acc",
                "retain_qa_acc", "forget_rouge", "retain_rouge", "forget_truth_ratio", "retain_truth_ratio",
                "forget_es"} | {f"mia_{m}_auc" for m in lm.MIA_NAMES}
    assert set(metrics) == expected
    assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())
    # The shared pass gives what the single-metric functions give.
    assert metrics["forget_nll"] == pytest.approx(float(lm.answer_nll(model, forget).mean()), rel=1e-6)
    assert metrics["forget_es"] == pytest.approx(float(lm.extraction_strength(model, forget).mean()), rel=1e-6)
    assert metrics["forget_qa_acc"] == lm.qa_accuracy(model, forget)
    assert metrics["retain_rouge"] == pytest.approx(lm.qa_rouge(model, retain))
    for name, fn in [("zlib", lm.mia_zlib), ("min_k++", lm.mia_min_k_plus_plus), ("gradnorm", lm.mia_gradnorm)]:
        assert metrics[f"mia_{name}_auc"] == pytest.approx(lm.mia_auc(fn(model, forget), fn(model, data["holdout"])))
    assert metrics["forget_truth_ratio"] == pytest.approx(lm.truth_ratio_forget_score(lm.truth_ratio(model, forget)))
    # The raw forget truth ratios are the retrained model's reference: against itself, forget quality is 1.
    again = lm.evaluate_lm(model, forget, retain, retrained_truth_ratio=raw["forget_truth_ratio"], mias=(),
                           generation=False)
    assert again["forget_quality"] == pytest.approx(1.0)
    assert "holdout_nll" not in again and "forget_qa_acc" not in again and "mia_loss_auc" not in again


def test_metrics_leave_weights_grads_and_mode_unchanged(data, tokenizer):
    model = lora_gpt2(tokenizer)
    model.base_model.model.config.resid_pdrop = 0.1
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lm.evaluate_lm(model, data["forget"], Subset(data["retain"], [0, 1]), data["holdout"])
    lm.per_sample_loop_gradnorm(model, data["forget"])
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    model = tiny_gpt2(tokenizer, dropout=0.5).train()
    # Eval mode inside: with dropout 0.5 active two runs would differ.
    torch.testing.assert_close(lm.answer_nll(model, data["forget"]), lm.answer_nll(model, data["forget"]), rtol=0,
                               atol=0)
    assert model.training


# ---------------------------------------------------------------------------------------------- errors
class NoLogits(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None):
        return input_ids.float()


def test_bad_input_raises_errors_that_name_the_problem(data, tokenizer, splits):
    model = tiny_gpt2(tokenizer)
    with pytest.raises(errors.EmptyInputError, match="ds holds no samples"):
        lm.answer_nll(model, Subset(data["forget"], []))
    with pytest.raises(errors.EmptyInputError, match="retain"):
        lm.evaluate_lm(model, data["forget"], Subset(data["retain"], []))
    bare = QADataset([{"question": r["question"], "answer": r["answer"]} for r in splits["forget"]], tokenizer)
    with pytest.raises(errors.InvalidInputError, match="paraphrased_answer"):
        lm.truth_ratio(model, bare)
    no_perturbed = QADataset([{**r, "perturbed_answers": []} for r in splits["forget"]], tokenizer)
    with pytest.raises(errors.InvalidInputError, match="perturbed_answers"):
        lm.truth_ratio(model, no_perturbed)
    with pytest.raises(errors.InvalidInputError, match="perturbed_answers"):
        lm.evaluate_lm(model, no_perturbed, data["retain"], retrained_truth_ratio=torch.ones(3), generation=False)
    for k in (0, 1.5, -0.1):
        with pytest.raises(errors.InvalidInputError, match="k must be"):
            lm.mia_min_k(model, data["forget"], k=k)
        with pytest.raises(errors.InvalidInputError, match="k must be"):
            lm.mia_min_k_plus_plus(model, data["forget"], k=k)
    with pytest.raises(errors.InvalidInputError, match="logits"):
        lm.answer_nll(NoLogits(), data["forget"])
    with pytest.raises(errors.InvalidInputError, match="mias"):
        lm.evaluate_lm(model, data["forget"], data["retain"], data["holdout"], mias=("min_k", "ppl"))
    with pytest.raises(errors.InvalidInputError, match="prefix_fraction"):
        lm.verbatim_rouge(model, data["forget"], prefix_fraction=1.0)
    with pytest.raises(errors.EmptyInputError, match="holdout_scores"):
        lm.mia_auc([0.1], [])
    with pytest.raises(errors.InvalidInputError, match="auc_retrained"):
        lm.privleak(0.5, auc_retrained=1.0)
    with pytest.raises(errors.InvalidInputError, match="frozen"):
        lm.mia_gradnorm(tiny_gpt2(tokenizer).requires_grad_(False), data["forget"])
