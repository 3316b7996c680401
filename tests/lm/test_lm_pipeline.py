"""The causal-LM half of the orchestrator: bad input, LoRA adapters (shared reference, safetensors, merged
export), loading from a local folder, the transaction on failure, coreset selection on text."""
import json

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from erasus import ErasusUnlearner, errors
from erasus.data import QADataset
from erasus.data.tofu import build_tokenizer, corpus_texts, tofu_splits
from erasus.tasks import CausalLM, Reference

LORA = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["c_attn"]}


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    splits = tofu_splits(8, 0.25, seed=0, per_author=4)
    tok = build_tokenizer(corpus_texts(splits["forget"] + splits["retain"] + splits["holdout"]))
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(tok), n_positions=64,
                                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                       eos_token_id=tok.eos_token_id)).eval()
    sets = {k: QADataset(v, tok) for k, v in splits.items()}
    return model, tok, sets, splits


def fast_task():
    return CausalLM(generation=False, mias=("loss",))


def run(model, sets, **kw):
    kw.setdefault("task", fast_task())
    kw.setdefault("selector", None)
    kw.setdefault("prune_ratio", 1.0)
    return ErasusUnlearner(model, **kw).fit(sets["forget"], sets["retain"], test=sets["holdout"])


def test_lora_trains_only_the_adapter_with_a_shared_reference(tiny, tmp_path):
    model, tok, sets, _ = tiny
    base = {k: v.clone() for k, v in model.state_dict().items()}
    peft_model, report = run(model, sets, strategy="npo", strategy_params={"lr": 1e-2}, lora=LORA, epochs=2,
                             batch_size=4, copy=True, out_dir=tmp_path / "run", save_merged=True)
    assert report["reference"] == {"kind": "adapter disabled (shared weights)", "extra_bytes": 0}
    assert report["lora"]["r"] == 4 and report["lora"]["trainable_params"] < report["lora"]["total_params"]
    assert all(torch.equal(base[k], v) for k, v in model.state_dict().items())  # copy=True: untouched
    assert report["metrics"]["forget_nll"] > report["original"]["forget_nll"]
    adapter = tmp_path / "run" / "adapter"
    assert (adapter / "adapter_model.safetensors").exists() and not list(adapter.glob("*.bin"))
    # the adapter loads back onto the original model and gives the unlearned outputs
    from peft import PeftModel

    import copy

    reloaded = PeftModel.from_pretrained(copy.deepcopy(model).eval(), str(adapter))
    batch = sets["forget"].collate([sets["forget"][i] for i in range(3)])
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    peft_model.eval()
    torch.testing.assert_close(reloaded(**inputs).logits, peft_model(**inputs).logits)
    merged = GPT2LMHeadModel.from_pretrained(str(tmp_path / "run" / "merged"))
    torch.testing.assert_close(merged(**inputs).logits, peft_model(**inputs).logits, atol=1e-5, rtol=1e-5)


def test_a_frozen_copy_reference_costs_the_model_and_the_adapter_one_costs_nothing(tiny):
    model, *_ = tiny
    from erasus.tasks.lora import apply_lora, remove_lora

    copy_ref = Reference(model)
    tied = model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    once = sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers())
    assert tied and copy_ref.copied_bytes == once  # the tied head and embedding counted once
    import copy

    peft_model = apply_lora(copy.deepcopy(model), LORA)
    assert Reference(peft_model).copied_bytes == 0
    remove_lora(peft_model)


def test_full_fine_tuning_moves_the_model_in_place(tiny):
    model, _, sets, _ = tiny
    import copy

    m = copy.deepcopy(model)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    same, report = run(m, sets, strategy="graddiff", strategy_params={"lr": 1e-3}, epochs=1, batch_size=4)
    assert same is m and report["reference"]["kind"] == "none"
    assert any(not torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_every_selector_picks_a_coreset_of_an_lm_forget_set(tiny):
    model, _, sets, _ = tiny
    from erasus.selectors import SELECTORS

    for name in SELECTORS:
        _, report = run(model, sets, strategy="ga", selector=name, prune_ratio=0.5, copy=True, epochs=1,
                        batch_size=4, strategy_params={"lr": 1e-4})
        assert report["coreset_size"] == len(sets["forget"]) // 2, name
        assert report["forget_sample_passes"] == report["coreset_size"]


def test_a_failure_mid_run_restores_the_model_and_removes_the_adapter(tiny):
    model, _, sets, _ = tiny
    import copy

    from erasus.strategies import GradDiff

    class Boom(GradDiff):
        calls = 0

        def method_loss(self, m, fb, rb):
            Boom.calls += 1
            if Boom.calls == 3:
                raise KeyboardInterrupt
            return super().method_loss(m, fb, rb)

    for lora in (None, LORA):
        m = copy.deepcopy(model).train()
        before = {k: v.clone() for k, v in m.state_dict().items()}
        Boom.calls = 0
        with pytest.raises(KeyboardInterrupt):
            run(m, sets, strategy=Boom(lr=1e-2), lora=lora, epochs=3, batch_size=2)
        assert m.training and not any("lora_" in n for n, _ in m.named_parameters())
        assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_local_folder_loading_and_the_cli_config(tiny, tmp_path, capsys):
    model, tok, sets, splits = tiny
    from erasus.cli import main
    from erasus.tasks.loading import load_causal_lm

    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    loaded, loaded_tok = load_causal_lm(tmp_path / "model")
    assert len(loaded_tok) == len(tok)
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])
    for split, records in splits.items():
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    out = tmp_path / "out"
    config = tmp_path / "lm.yaml"
    config.write_text(f"task: causal_lm\nmodel: {tmp_path / 'model'}\nstrategy: graddiff\n"
                      f"strategy_params: {{lr: 0.001}}\nepochs: 1\nlora: {{r: 4, target_modules: [c_attn]}}\n"
                      f"data: {{forget: {tmp_path / 'forget.jsonl'}, retain: {tmp_path / 'retain.jsonl'}, "
                      f"holdout: {tmp_path / 'holdout.jsonl'}}}\nout_dir: {out}\n")
    assert main(["unlearn", "--config", str(config)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["task"] == "causal_lm" and report["lora"]["r"] == 4
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert main(["unlearn", "--config", str(config).replace("lm.yaml", "missing.yaml")]) == 2


def test_bad_lm_input_gets_a_clear_error(tiny):
    model, tok, sets, splits = tiny
    from torch.utils.data import Subset

    cases = [
        (lambda: run(model, {**sets, "forget": Subset(sets["forget"], [])}, strategy="ga"), errors.EmptyInputError,
         "forget set is empty"),
        (lambda: run(model, {**sets, "forget": QADataset(splits["retain"][:3], tok)}, strategy="ga"),
         errors.InvalidInputError, "share 3 samples by content"),
        (lambda: run(model, sets, strategy="ga", lora={"r": 4, "target_modules": ["q_proj"]}),
         errors.InvalidInputError, "q_proj.*not found"),
        (lambda: run(torch.nn.Linear(3, 3), sets, strategy="ga", task="causal_lm"), errors.InvalidInputError,
         "needs a transformers causal LM"),
        (lambda: ErasusUnlearner(torch.nn.Linear(3, 3), "elm" if "elm" in __import__("erasus").strategies.STRATEGIES
                                 else "ga", task="classification") if False else
         run(model, {**sets, "retain": (torch.zeros(3, 2), torch.zeros(3))}, strategy="ga"),
         errors.InvalidInputError, "retain must be a Dataset"),
    ]
    for make, error, match in cases:
        with pytest.raises(error, match=match):
            make()
    long = [{"question": "Where " * 70, "answer": "x"}]
    short_model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=len(tok), n_positions=16))
    with pytest.raises(errors.ShapeError, match="context"):
        run(short_model, {**sets, "forget": QADataset(long, tok)}, strategy="ga")
    no_pad = build_tokenizer(corpus_texts(splits["retain"]))
    no_pad.pad_token = None
    with pytest.raises(errors.InvalidInputError, match="pad"):
        QADataset(splits["retain"], no_pad)
