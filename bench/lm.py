"""Causal-LM costs: the frozen reference, the GradNorm MIA, and one unlearning step per strategy.

    OMP_NUM_THREADS=1 python bench/lm.py --quick      # small shapes, about a minute; prints only
    OMP_NUM_THREADS=1 python bench/lm.py --record     # the fuller grid, appended to bench/RESULTS.md

Without --record nothing tracked is written.

One torch thread by default (--threads): see its help.

Models are GPT-2 and Llama built from configs (random weights, no download); data is the offline TOFU-style
corpus (``erasus.data.tofu``) tokenized by ``build_tokenizer``, and for the longer sequences several of its
records joined into one text. Three tables, each from one process (bench/harness.py's protocol: check first,
then time interleaved, medians with 20/80 quantiles, warm-up calls excluded):

1. Memory of the frozen reference: ``erasus.tasks.Reference(peft_model)`` (the same model under
   ``disable_adapter()``) against ``Reference(plain_model)`` (a frozen deep copy, what OpenUnlearning keeps), on
   a GPT-2 of a few hundred MB. Reported: ``copied_bytes`` and the measured growth of the process RSS;
   checked: the reference's logits equal the base model's while the adapted model's differ.
2. GradNorm MIA: ``erasus.metrics.lm.mia_gradnorm`` (one batched forward+backward per batch through
   ``erasus.ops.grad_norms``) against ``per_sample_loop_gradnorm`` (a backward per sample), checked equal to
   rtol 1e-4 first; full model and LoRA adapters.
3. One step per gradient strategy (``strategy.loss`` + ``strategy.step``: backward, the strategy's gradient
   hooks, the optimizer step) against one plain NLL training step (``model(**batch).loss``, backward, Adam) on
   the same forget batch, with and without a peft LoRA adapter. One-off work (SalUn's mask, ELM's fluency
   data, the deep-copied reference of a full model) happens in ``prepare``/warm-up and is not timed.
"""
from __future__ import annotations

import argparse
import copy
import gc
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
# bench/selectors.py would shadow the standard library's selectors module: keep this folder last on the path.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE] + [_HERE]

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

import harness  # noqa: E402

from erasus.data import QADataset, TextDataset, build_tokenizer, tofu_splits  # noqa: E402
from erasus.data.lm_models import tiny_causal_lm  # noqa: E402
from erasus.data.tofu import corpus_texts  # noqa: E402
from erasus.metrics.lm import mia_gradnorm, per_sample_loop_gradnorm  # noqa: E402
from erasus.strategies import STRATEGIES, GradientStrategy, TrainingGuard, get_strategy  # noqa: E402
from erasus.tasks import Reference  # noqa: E402

try:  # ELM lives in its own module, registered on import
    import erasus.strategies.elm  # noqa: E402,F401
except ImportError:
    pass

LORA_TARGETS = {"gpt2": ["c_attn", "c_proj", "c_fc"], "llama": ["q_proj", "k_proj", "v_proj", "o_proj",
                                                                 "gate_proj", "up_proj", "down_proj"]}
MIA_RTOL = 1e-4


# ------------------------------------------------------------------------------------------------ plumbing
def rss_bytes() -> int:
    """The process's resident set size now (Linux /proc/self/statm)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def unique_bytes(model) -> int:
    """Bytes of the model's tensors, each storage once (GPT-2's lm_head shares the token embedding's)."""
    storages = {}
    for t in model.state_dict().values():
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def lora(model, arch: str, r: int = 8):
    """``model`` with a peft LoRA adapter (rank r) on every attention and MLP projection; peft injects it in place."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=LORA_TARGETS[arch],
                        fan_in_fan_out=arch == "gpt2")  # GPT-2's projections are Conv1D (weight stored d_in x d_out)
    return get_peft_model(model, config)


def fmt_ms(samples: list[float]) -> str:
    med, lo, hi = harness.quantiles(samples)
    return f"{med * 1e3:.1f} ({lo * 1e3:.1f}–{hi * 1e3:.1f})"


def median_s(samples: list[float]) -> float:
    return harness.quantiles(samples)[0]


class Corpus:
    """The TOFU-style splits, their word-level tokenizer, and datasets of QA records or of joined records."""

    def __init__(self, n_authors: int):
        self.splits = tofu_splits(n_authors=n_authors, forget=0.1, seed=0)
        records = self.splits["forget"] + self.splits["retain"] + self.splits["holdout"]
        self.tokenizer = build_tokenizer(corpus_texts(records))
        self.records = records

    @property
    def special(self) -> dict:
        tok = self.tokenizer
        return {"pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}

    def qa(self, split: str, n: int) -> QADataset:
        return QADataset(self.splits[split][:n], self.tokenizer)

    def joined(self, n: int, records_per_text: int) -> TextDataset:
        """n texts of ``records_per_text`` consecutive QA pairs each: longer sequences from the same corpus."""
        texts = []
        for i in range(n):
            chunk = [self.records[(i * records_per_text + j) % len(self.records)] for j in range(records_per_text)]
            texts.append(" ".join(f"{r['question']} {r['answer']}" for r in chunk))
        return TextDataset(texts, self.tokenizer)


def seq_len(ds) -> int:
    return max(len(ds[i]["input_ids"]) for i in range(len(ds)))


# ------------------------------------------------------------------------------- 1. memory of the reference
def reference_memory(n_layer: int, n_embd: int, vocab: int, seq: int) -> list[str]:
    """RSS growth and copied bytes of a shared (adapter-disabled) reference against a deep-copied one, on a
    GPT-2 of ``n_layer`` x ``n_embd`` with a GPT-2-sized vocabulary; checks the reference's logits."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=vocab, n_positions=max(seq, 64), n_embd=n_embd, n_layer=n_layer,
                        n_head=max(1, n_embd // 64), resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config).eval()
    weights = unique_bytes(model)
    ids = torch.randint(vocab, (2, seq), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base_logits = model(input_ids=ids).logits

    gc.collect()
    before = rss_bytes()
    deep = Reference(model)  # a plain model: a frozen deep copy
    deep_rss = rss_bytes() - before
    with torch.no_grad(), deep.use() as module:
        deep_diff = float((module(input_ids=ids).logits - base_logits).abs().max())
    deep_bytes = deep.copied_bytes
    del deep, module
    gc.collect()

    peft_model = lora(model, "gpt2")
    with torch.no_grad():  # a trained adapter: B non-zero, so the adapted model really differs from the base
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
        adapted_diff = float((peft_model(input_ids=ids).logits - base_logits).abs().max())
    gc.collect()
    before = rss_bytes()
    shared = Reference(peft_model)
    shared_rss = rss_bytes() - before
    with torch.no_grad(), shared.use() as module:
        shared_diff = float((module(input_ids=ids).logits - base_logits).abs().max())
    if not (shared.shared and shared.copied_bytes == 0 and shared_diff == 0.0 and deep_diff == 0.0
            and adapted_diff > 0):
        raise AssertionError(f"reference check failed: shared={shared.shared} copied={shared.copied_bytes} "
                             f"shared_diff={shared_diff} deep_diff={deep_diff} adapted_diff={adapted_diff}")
    adapter = sum(p.numel() * p.element_size() for n, p in peft_model.named_parameters() if "lora_" in n)
    mb = 1e6
    return [
        f"GPT-2 {n_layer} layers x {n_embd}, vocab {vocab}: {weights / mb:.0f} MB of weights (distinct storage); LoRA r=8 on "
        f"c_attn/c_proj/c_fc adds {adapter / mb:.1f} MB. Logits on a 2 x {seq} batch: the shared reference's equal "
        f"the base model's exactly (max |diff| {shared_diff:g}; the deep copy's {deep_diff:g}) while the adapted "
        f"model's differ by up to {adapted_diff:.3g}.",
        "",
        "| reference | copied_bytes MB | measured RSS growth MB |",
        "|---|---|---|",
        f"| `Reference(peft_model)` (same model, `disable_adapter()`) **(ours)** | {shared.copied_bytes / mb:.1f} | "
        f"{shared_rss / mb:.1f} |",
        f"| `Reference(plain_model)` (frozen deep copy, OpenUnlearning's) | {deep_bytes / mb:.1f} | {deep_rss / mb:.1f} |",
        "",
        f"Saved: {(deep_rss - shared_rss) / mb:.0f} MB of RSS ({(deep_rss - shared_rss) / weights:.2f}x the "
        f"{weights / mb:.0f} MB of distinct weight storage). `copied_bytes` sums the state dict, so it counts GPT-2's "
        "tied lm_head / wte matrix twice; the RSS growth is what the copy costs. (tracemalloc is not used: it sees "
        "only Python's allocator, not torch's tensor storage, so it reads ~0 for both.)",
    ]


# -------------------------------------------------------------------------------------------- 2. GradNorm MIA
def gradnorm_cases(quick: bool, corpus: Corpus) -> list[tuple]:
    """(arch, n_layer, hidden, dataset label, dataset)."""
    n = 32 if quick else 64
    short = corpus.qa("retain", n)
    cases = [("gpt2", 2, 64, "QA", short), ("llama", 2, 64, "QA", short)]
    if quick:
        return cases
    long = corpus.joined(n, records_per_text=4)
    return cases + [("gpt2", 4, 256, "QA", short), ("llama", 4, 256, "QA", short),
                    ("gpt2", 4, 256, "4 QA joined", long), ("llama", 4, 256, "4 QA joined", long)]


def gradnorm_table(quick: bool, corpus: Corpus, repeats: int) -> list[str]:
    lines = ["| model | data | n | T max | params counted | mia_gradnorm ms **(ours)** | per-sample loop ms | "
             "loop / ours | max rel diff |", "|---|---|---|---|---|---|---|---|---|"]
    cpu = torch.device("cpu")
    for arch, n_layer, hidden, label, ds in gradnorm_cases(quick, corpus):
        length = seq_len(ds)
        for use_lora in (False, True):
            model = tiny_causal_lm(arch, len(corpus.tokenizer), n_layer=n_layer, hidden=hidden,
                                   max_positions=max(64, length), **corpus.special)
            if use_lora:
                model = lora(model, arch)
                with torch.no_grad():
                    for name, p in model.named_parameters():
                        if "lora_B" in name:  # as after training: otherwise A's gradient is exactly zero
                            p.normal_(0, 0.02)
            ours = mia_gradnorm(model, ds, batch_size=16)
            loop = per_sample_loop_gradnorm(model, ds)
            rel = float(((ours - loop).abs() / loop.abs()).max())
            if not torch.allclose(ours, loop, rtol=MIA_RTOL, atol=0.0):
                raise AssertionError(f"{arch} {label} lora={use_lora}: mia_gradnorm differs from the loop by {rel:.2e}")
            times = harness.interleaved({"ours": lambda: mia_gradnorm(model, ds, batch_size=16),
                                         "loop": lambda: per_sample_loop_gradnorm(model, ds)}, cpu, repeats)
            counted = sum(p.numel() for p in model.parameters() if p.requires_grad)
            name = f"{arch} {n_layer}x{hidden}" + (" + LoRA r=8" if use_lora else "")
            row = (f"| {name} | {label} | {len(ds)} | {length} | {counted / 1e6:.2f}M | {fmt_ms(times['ours'])} | "
                   f"{fmt_ms(times['loop'])} | {median_s(times['loop']) / median_s(times['ours']):.1f}x | {rel:.1e} |")
            print(row, flush=True)
            lines.append(row)
    return lines


# ------------------------------------------------------------------------------ 3. one step per strategy
def strategy_params(name: str, corpus: Corpus) -> dict:
    """Constructor arguments: a small lr (timing only, the model must stay finite over the repeats)."""
    params = {"lr": 1e-5}
    if name == "elm":
        params.update(concept=corpus.splits["forget"][0]["answer"].split()[0], fluency_tokens=8)
    if name == "rmu":
        params.update(layer=1)
    return params


def gradient_strategies() -> list[str]:
    return sorted(n for n, cls in STRATEGIES.items() if issubclass(cls, GradientStrategy))


def plain_step(model, opt, batch) -> None:
    """One ordinary training step: HF's own NLL (labels -100 ignored), backward, Adam."""
    opt.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    opt.step()


def unlearning_step(strategy, model, opt, guard, forget_batch, retain_batch) -> None:
    """What GradientStrategy._run does per forget batch: loss, backward, the strategy's hooks, optimizer step."""
    opt.zero_grad(set_to_none=True)
    strategy.step(model, strategy.loss(model, forget_batch, retain_batch), opt, guard)


def step_table(quick: bool, corpus: Corpus, repeats: int, warmup: int) -> list[str]:
    batch_size = 8 if quick else 16
    forget = corpus.qa("forget", batch_size)
    retain = corpus.qa("retain", batch_size)
    forget_loader = DataLoader(forget, batch_size=batch_size, collate_fn=forget.collate)
    retain_loader = DataLoader(retain, batch_size=batch_size, collate_fn=retain.collate)
    fb, rb = next(iter(forget_loader)), next(iter(retain_loader))
    shapes = [("gpt2", 2, 64)] if quick else [("gpt2", 4, 256), ("llama", 4, 256)]
    names = gradient_strategies()
    cpu = torch.device("cpu")
    lines = [f"Forget and retain batches of {batch_size} QA records (T = {fb['input_ids'].shape[1]} / "
             f"{rb['input_ids'].shape[1]} tokens). Strategies: {', '.join(names)}.", "",
             "| model | strategy | trainable | strategy step ms | plain NLL step ms | strategy / plain |",
             "|---|---|---|---|---|---|"]
    for arch, n_layer, hidden in shapes:
        base = tiny_causal_lm(arch, len(corpus.tokenizer), n_layer=n_layer, hidden=hidden, **corpus.special)
        for use_lora in (False, True):
            for name in names:
                model = copy.deepcopy(base)
                plain = copy.deepcopy(base)
                if use_lora:
                    model, plain = lora(model, arch), lora(plain, arch)
                strategy = get_strategy(name, **strategy_params(name, corpus))
                strategy.bind(model)
                strategy.prepare(model, forget_loader, retain_loader)  # one-off work (SalUn's mask, ELM's data)
                model.train(), plain.train()
                opt = strategy.make_optimizer([p for p in model.parameters() if p.requires_grad])
                plain_opt = torch.optim.Adam([p for p in plain.parameters() if p.requires_grad], lr=1e-5)
                guard = TrainingGuard(model)
                impls = {"strategy": lambda: unlearning_step(strategy, model, opt, guard, fb, rb),
                         "plain": lambda: plain_step(plain, plain_opt, fb)}
                harness.interleaved(impls, cpu, warmup)  # warm-up: the first calls also make the reference
                times = harness.interleaved(impls, cpu, repeats)
                trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
                label = f"{arch} {n_layer}x{hidden}" + (" + LoRA r=8" if use_lora else "")
                ratio = median_s(times["strategy"]) / median_s(times["plain"])
                row = (f"| {label} | {name} | {trainable / 1e6:.2f}M | {fmt_ms(times['strategy'])} | "
                       f"{fmt_ms(times['plain'])} | {ratio:.2f}x |")
                print(row, flush=True)
                lines.append(row)
                del model, plain, strategy, opt, plain_opt, guard, impls
                gc.collect()
    return lines


# ------------------------------------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes (about a minute)")
    harness.add_record_flag(parser)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared 2-core machine, 2 threads whose cores are taken "
                             "by other jobs stall in OpenMP barriers, 2 s for a step that takes 26 ms on 1 thread)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per implementation")
    parser.add_argument("--only", choices=("memory", "gradnorm", "steps"), action="append",
                        help="run only these parts (repeatable)")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    torch.set_num_threads(args.threads)
    parts = args.only or ["memory", "gradnorm", "steps"]
    repeats = args.repeats or (3 if args.quick else 5)
    load = open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else ["?"] * 3
    print(f"{harness.machine_name()}; torch threads {torch.get_num_threads()}, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')}; load average {' '.join(load)}", flush=True)
    corpus = Corpus(n_authors=20 if args.quick else 50)
    body = [f"Run: `OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')} python bench/lm.py"
            f"{' --quick' if args.quick else ''} --threads {args.threads}`; torch threads {torch.get_num_threads()}; load average at start "
            f"{' '.join(load)} (a shared machine: other jobs ran beside this one). Vocabulary: the word-level "
            f"tokenizer of the TOFU-style corpus ({len(corpus.tokenizer)} tokens) except in (1). Times: median "
            f"(20–80% quantiles) of {repeats} interleaved calls after warm-up.", ""]
    if "memory" in parts:
        n_layer, n_embd = (6, 768) if args.quick else (12, 768)
        body += ["### 1. Frozen reference: adapter-disabled vs deep copy", ""]
        body += reference_memory(n_layer, n_embd, vocab=50257, seq=32) + [""]
        print("\n".join(body[-12:]), flush=True)
    if "gradnorm" in parts:
        body += ["### 2. GradNorm MIA: batched (`erasus.ops.grad_norms`) vs per-sample loop", "",
                 f"Both give the whole-model L2 gradient norm of each sample's token-mean answer NLL over the "
                 f"trainable parameters (checked equal to rtol {MIA_RTOL:g} before timing); ours runs batches of 16. "
                 "LoRA rows count the adapter only (B initialised non-zero, as after training).", ""]
        body += gradnorm_table(args.quick, corpus, repeats) + [""]
    if "steps" in parts:
        body += ["### 3. One unlearning step per strategy vs one plain NLL step, same forget batch", "",
                 "Strategy step: `strategy.loss(model, forget_batch, retain_batch)` + `strategy.step` (backward, "
                 "gradient hooks such as SalUn's mask, optimizer step); plain step: `model(**forget_batch).loss`, "
                 "backward, Adam. Two warm-up steps each are not timed (they make the deep-copied reference of a "
                 "full model; with LoRA the reference is the adapter-disabled model). SCRUB's row is its forget "
                 "(max) step; finetune's loss reads the retain batch.", ""]
        body += step_table(args.quick, corpus, repeats, warmup=2) + [""]
    text = "\n".join(body)
    print("\n" + text)
    harness.record_results(args, "bench/lm.py" + (" --quick" if args.quick else ""), text)


if __name__ == "__main__":
    main()
