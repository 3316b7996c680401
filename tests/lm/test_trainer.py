"""The Hugging Face Trainer integration (erasus.integrations.trainer): UnlearningTrainer runs the strategies' own
losses, LoRA trains only the adapter against a shared reference, the guard restores bit for bit and stops, the
metrics callback stops at its target, SalUn's masked weights never move, and what a Trainer cannot run is refused.
Tiny GPT-2 models built from a config on a generated 4-author corpus; every run is a few optimizer steps."""
import copy

import peft
import pytest
import torch
import transformers
from torch import nn
from torch.utils.data import TensorDataset

from erasus.data import QADataset, build_tokenizer, tofu_splits
from erasus.data.tofu import corpus_texts
from erasus.errors import EmptyInputError, ErasusError, InvalidInputError
from erasus.integrations import ErasusGuardCallback, ForgetMetricsCallback, ForgetRetainDataset, UnlearningTrainer
from erasus.metrics import answer_nll
from erasus.strategies import GradientAscent, get_strategy


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The models here are tiny: a second intra-op thread only adds synchronisation, and on a loaded 2-core
    # machine its spin-waits make each step 10-50x slower. Restored after this module.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data():
    splits = tofu_splits(n_authors=4, forget=0.25, per_author=3)  # 3 forget, 9 retain, 3 holdout questions
    tokenizer = build_tokenizer(corpus_texts(sum(splits.values(), [])))
    return {name: QADataset(records, tokenizer) for name, records in splits.items()}


def tiny_gpt2(data, seed=0):
    tok = data["forget"].tokenizer
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(tok), n_positions=64,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=tok.pad_token_id,
                                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(cfg)


def lora_gpt2(data):
    # GPT-2's c_attn is a Conv1D (weight stored transposed): fan_in_fan_out=True tells peft.
    model = peft.get_peft_model(tiny_gpt2(data), peft.LoraConfig(target_modules=["c_attn"], r=4, lora_dropout=0.0,
                                                                 fan_in_fan_out=True))
    torch.manual_seed(1)
    for module in model.modules():  # peft starts B at zero: move it so that the adapter changes the outputs
        if hasattr(module, "lora_B"):
            nn.init.normal_(module.lora_B["default"].weight, std=0.1)
    return model


def training_args(tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path), max_steps=3, learning_rate=1e-2, per_device_train_batch_size=3,
                    save_strategy="no", report_to=[], use_cpu=True, logging_steps=1, disable_tqdm=True,
                    train_sampling_strategy="sequential")
    settings.update(overrides)
    return transformers.TrainingArguments(**settings)


def forget_nll(model, data):
    return float(answer_nll(model, data["forget"]).mean())


def trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


class WeightsAfterEachStep(transformers.TrainerCallback):
    """Copies of the trainable weights after every optimizer step (after the guard has acted)."""

    def __init__(self):
        self.after = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.after[0] = trainable(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.after[state.global_step] = trainable(model)


# ------------------------------------------------------------------------------------------------------- data
def test_forget_retain_dataset_pairs_each_forget_item_with_a_seeded_retain_item(data):
    pairs = ForgetRetainDataset(data["forget"], data["retain"], seed=3)
    assert len(pairs) == len(data["forget"])
    assert pairs.retain_indices == ForgetRetainDataset(data["forget"], data["retain"], seed=3).retain_indices
    assert all(0 <= j < len(data["retain"]) for j in pairs.retain_indices)
    for i in range(len(pairs)):
        item = pairs[i]
        assert torch.equal(item["forget"]["input_ids"], data["forget"][i]["input_ids"])
        assert torch.equal(item["retain"]["input_ids"], data["retain"][pairs.retain_indices[i]]["input_ids"])
    batch = pairs.collate([pairs[0], pairs[2]])
    expected = data["retain"].collate([data["retain"][pairs.retain_indices[i]] for i in (0, 2)])
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(batch["retain"][key], expected[key])
    assert batch["forget"]["input_ids"].shape[0] == 2
    assert set(ForgetRetainDataset(data["forget"]).collate([pairs[0]])) == {"forget"}
    with pytest.raises(IndexError):
        pairs[len(pairs)]


def test_forget_retain_dataset_falls_back_to_default_collate_and_refuses_empty_sets(data):
    torch.manual_seed(0)  # fixed data, whatever ran before
    x = TensorDataset(torch.randn(4, 3), torch.arange(4))
    batch = ForgetRetainDataset(x, x, seed=0).collate([{"forget": x[0], "retain": x[1]}] * 2)
    assert batch["forget"][0].shape == (2, 3) and batch["retain"][1].tolist() == [1, 1]
    with pytest.raises(EmptyInputError, match="forget"):
        ForgetRetainDataset(TensorDataset(torch.empty(0, 3)), data["retain"])
    with pytest.raises(EmptyInputError, match="retain"):
        ForgetRetainDataset(data["forget"], TensorDataset(torch.empty(0, 3)))
    with pytest.raises(InvalidInputError, match="seed"):
        ForgetRetainDataset(data["forget"], data["retain"], seed=0.5)


# ---------------------------------------------------------------------------------------------------- trainer
@pytest.mark.parametrize("name", ["graddiff", "npo"])
def test_trainer_loss_is_the_strategy_loss_and_forgetting_raises_forget_nll(data, tmp_path, name):
    model = tiny_gpt2(data)
    pairs = ForgetRetainDataset(data["forget"], data["retain"], seed=0)
    first_batch = pairs.collate([pairs[i] for i in range(3)])  # sequential sampling, batch 3: the first batch
    expected = get_strategy(name).loss(copy.deepcopy(model).train(), first_batch["forget"],
                                       first_batch["retain"]).item()
    before = forget_nll(model, data)
    trainer = UnlearningTrainer(model, training_args(tmp_path, max_steps=4), train_dataset=pairs, strategy=name)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 4
    assert losses[0] == pytest.approx(expected, rel=1e-5)
    assert forget_nll(model, data) > before + 0.1
    assert trainer.guard_events == []


def test_gradient_accumulation_averages_micro_batches_like_one_batch(data, tmp_path):
    pairs = ForgetRetainDataset(data["forget"], data["retain"], seed=0)
    runs = {}
    for batch_size, accumulation in ((2, 1), (1, 2)):
        model = tiny_gpt2(data)
        args = training_args(tmp_path, max_steps=1, per_device_train_batch_size=batch_size, optim="sgd",
                             gradient_accumulation_steps=accumulation, max_grad_norm=0.0)  # plain averaged steps
        trainer = UnlearningTrainer(model, args, train_dataset=pairs, strategy="graddiff")
        trainer.train()
        runs[accumulation] = (trainer.state.log_history[0]["loss"], trainable(model))
    assert runs[2][0] == pytest.approx(runs[1][0], rel=1e-5)
    assert all(torch.allclose(runs[2][1][n], w, atol=1e-6) for n, w in runs[1][1].items())


def test_lora_trains_only_the_adapter_against_a_shared_reference(data, tmp_path):
    model = lora_gpt2(data)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    adapter = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    assert adapter and all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    before = forget_nll(model, data)
    trainer = UnlearningTrainer(model, training_args(tmp_path), strategy="npo",
                                train_dataset=ForgetRetainDataset(data["forget"], data["retain"]))
    trainer.train()
    reference = trainer.strategy.reference(model)
    assert reference.shared and reference.model is model and reference.copied_bytes == 0  # no deep copy
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], w) for n, w in base.items())  # base weights bit-identical
    assert sum(not torch.equal(params[n], w) for n, w in adapter.items()) == len(adapter)
    assert forget_nll(model, data) > before


def test_nan_loss_restores_the_previous_step_bit_for_bit_and_stops(data, tmp_path):
    strategy = GradientAscent()
    method_loss, calls = strategy.method_loss, []

    def nan_at_third_step(model, forget_batch, retain_batch):
        calls.append(1)
        loss = method_loss(model, forget_batch, retain_batch)
        return loss * float("nan") if len(calls) == 3 else loss

    strategy.method_loss = nan_at_third_step
    model = tiny_gpt2(data)
    record = WeightsAfterEachStep()
    trainer = UnlearningTrainer(model, training_args(tmp_path, max_steps=6), strategy=strategy, callbacks=[record],
                                train_dataset=ForgetRetainDataset(data["forget"]))
    with pytest.warns(RuntimeWarning, match="loss is nan"):
        trainer.train()
    assert trainer.state.global_step == 3 and len(calls) == 3  # stopped at the NaN step
    assert trainer.guard_events == [{"global_step": 3, "reason": "loss is nan", "restored_to_global_step": 2}]
    now = trainable(model)
    assert all(torch.equal(now[n], w) for n, w in record.after[2].items())
    assert any(not torch.equal(now[n], w) for n, w in record.after[0].items())  # steps 1-2 did move the weights


def test_guard_and_metrics_callbacks_work_in_a_plain_trainer(data, tmp_path):
    model = tiny_gpt2(data)
    forwards = []

    def nan_loss_at_third_training_forward(module, inputs, output):
        if module.training and torch.is_grad_enabled():
            forwards.append(1)
            if len(forwards) == 3:
                output.loss = output.loss * float("nan")
        return output

    model.register_forward_hook(nan_loss_at_third_training_forward)
    guard, record = ErasusGuardCallback(), WeightsAfterEachStep()
    metrics = ForgetMetricsCallback(data["forget"], data["retain"], every=1, qa_accuracy=True)
    trainer = transformers.Trainer(model, training_args(tmp_path, max_steps=6), train_dataset=data["retain"],
                                   data_collator=data["retain"].collate, callbacks=[guard, record, metrics])
    with pytest.warns(RuntimeWarning, match="loss is nan"):
        trainer.train()
    assert guard.events == [{"global_step": 3, "reason": "loss is nan", "restored_to_global_step": 2}]
    assert trainer.state.global_step == 3
    now = trainable(model)
    assert all(torch.equal(now[n], w) for n, w in record.after[2].items())
    logged = [entry for entry in trainer.state.log_history if "forget_nll" in entry]
    assert [entry["step"] for entry in logged] == [1, 2, 3] and logged[-1]["forget_nll"] == pytest.approx(
        forget_nll(model, data), rel=1e-6)
    assert all(0.0 <= entry[key] <= 1.0 for entry in logged for key in ("forget_qa_acc", "retain_qa_acc"))


def test_metrics_callback_stops_at_the_first_evaluation_reaching_the_target(data, tmp_path):
    model = tiny_gpt2(data)
    target = forget_nll(model, data) + 0.3
    metrics = ForgetMetricsCallback(data["forget"], data["retain"], data["holdout"], target=target, every=1)
    trainer = UnlearningTrainer(model, training_args(tmp_path, max_steps=30, learning_rate=1e-3), strategy="ga",
                                callbacks=[metrics],
                                train_dataset=ForgetRetainDataset(data["forget"]))
    trainer.train()
    step = metrics.stopped_at["step"]
    assert 1 < step < 30 and trainer.state.global_step == step
    nll = [entry["forget_nll"] for entry in metrics.history]
    assert all(value < target for value in nll[:-1]) and nll[-1] >= target
    assert metrics.stopped_at["forget_nll"] == nll[-1] == pytest.approx(forget_nll(model, data), rel=1e-6)
    logged = [entry for entry in trainer.state.log_history if "forget_nll" in entry]  # through trainer.log
    assert len(logged) == step and {"retain_nll", "holdout_nll"} <= set(logged[-1])
    assert sum("loss" in entry for entry in trainer.state.log_history) == step  # the Trainer's own logs kept
    with pytest.raises(InvalidInputError, match="ForgetMetricsCallback"):
        trainer.evaluate()


def test_salun_masked_weights_never_move_under_the_trainer(data, tmp_path):
    model = tiny_gpt2(data)
    original = trainable(model)
    trainer = UnlearningTrainer(model, training_args(tmp_path, weight_decay=0.1), strategy="salun",
                                strategy_params={"mask_ratio": 0.3},
                                train_dataset=ForgetRetainDataset(data["forget"], data["retain"]))
    trainer.train()
    masks, now = trainer.strategy.masks, trainable(model)
    assert set(masks) == set(now)
    assert all(torch.equal(now[n][~masks[n]], original[n][~masks[n]]) for n in now)  # AdamW decay included
    assert any(not torch.equal(now[n][masks[n]], original[n][masks[n]]) for n in now)


def test_rmu_layer_freezing_holds_for_the_run_and_is_undone_after(data, tmp_path):
    model = tiny_gpt2(data)
    block0 = {n: p.detach().clone() for n, p in model.transformer.h[0].named_parameters()}
    trainer = UnlearningTrainer(model, training_args(tmp_path), strategy="rmu",
                                strategy_params={"layer": 1, "train_layers": (1,), "steering_coeff": 5.0},
                                train_dataset=ForgetRetainDataset(data["forget"], data["retain"]))
    trainer.train()
    assert all(torch.equal(p, block0[n]) for n, p in model.transformer.h[0].named_parameters())
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("strategy, params, match", [
    ("ssd", None, "training-free"),
    ("fisher", None, "training-free"),
    ("scrub", None, "loop of its own"),
    ("npo", {"lr": 1e-3}, "TrainingArguments.learning_rate"),
    ("npo", {"max_grad_norm": 1.0}, "TrainingArguments.max_grad_norm"),
    ("no_such_strategy", None, "unknown strategy"),
])
def test_strategies_a_trainer_cannot_run_are_refused(data, tmp_path, strategy, params, match):
    with pytest.raises(ErasusError, match=match):
        UnlearningTrainer(tiny_gpt2(data), training_args(tmp_path), strategy=strategy, strategy_params=params,
                          train_dataset=ForgetRetainDataset(data["forget"], data["retain"]))


def test_bad_data_and_settings_are_refused(data, tmp_path):
    model, args = tiny_gpt2(data), training_args(tmp_path)
    pairs = ForgetRetainDataset(data["forget"], data["retain"])
    with pytest.raises(InvalidInputError, match="train_dataset must be a ForgetRetainDataset"):
        UnlearningTrainer(model, args, train_dataset=data["forget"], strategy="ga")
    with pytest.raises(InvalidInputError, match="needs retain data"):
        UnlearningTrainer(model, args, train_dataset=ForgetRetainDataset(data["forget"]), strategy="graddiff")
    with pytest.raises(InvalidInputError, match="overlap"):
        UnlearningTrainer(model, args, train_dataset=ForgetRetainDataset(data["forget"], data["forget"]),
                          strategy="graddiff")
    same_records = QADataset(data["forget"].records, data["forget"].tokenizer)
    with pytest.raises(InvalidInputError, match="by content"):
        UnlearningTrainer(model, args, train_dataset=ForgetRetainDataset(data["forget"], same_records),
                          strategy="graddiff")
    with pytest.raises(InvalidInputError, match="eval_dataset"):
        UnlearningTrainer(model, args, train_dataset=pairs, eval_dataset=pairs, strategy="ga")
    with pytest.raises(InvalidInputError, match="strategy_params are for a strategy given by name"):
        UnlearningTrainer(model, args, train_dataset=pairs, strategy=GradientAscent(), strategy_params={"x": 1})
    frozen = tiny_gpt2(data).requires_grad_(False)
    with pytest.raises(InvalidInputError, match="no trainable parameters"):
        UnlearningTrainer(frozen, args, train_dataset=pairs, strategy="ga")
    with pytest.raises(InvalidInputError, match="every"):
        ForgetMetricsCallback(data["forget"], data["retain"], every=0)
    with pytest.raises(InvalidInputError, match="target"):
        ForgetMetricsCallback(data["forget"], data["retain"], target=float("nan"))
