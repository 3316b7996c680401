"""Evaluation of unlearning: accuracies (UA/RA/TA), gaps to a retrained model, membership inference; for causal
LMs (``erasus.metrics.lm``) answer NLL, QA accuracy and ROUGE-L, truth ratio and forget quality, extraction strength,
and the LOSS / zlib / Min-K% / Min-K%++ / GradNorm MIAs; per-example attacks: the NeurIPS-2023 score and U-LiRA."""
from erasus.metrics.accuracy import accuracy, average_gap, predict_logits
from erasus.metrics.lm import (answer_nll, evaluate_lm, extraction_strength, forget_quality, greedy_answers,
                               mia_auc, mia_gradnorm, mia_loss, mia_min_k, mia_min_k_plus_plus, mia_zlib,
                               per_sample_loop_gradnorm, perplexity, privleak, qa_accuracy, qa_rouge, rouge_l_recall,
                               rouge_tokenize, token_logprobs, truth_ratio, truth_ratio_forget_score,
                               truth_ratio_retain_score, verbatim_rouge)
from erasus.metrics.mia import mia_efficacy, true_class_confidence
from erasus.metrics.neurips import final_score, forget_score, logit_scaled_confidence
from erasus.metrics.ulira import ulira

__all__ = ["accuracy", "average_gap", "predict_logits", "mia_efficacy", "true_class_confidence", "forget_score",
           "final_score", "logit_scaled_confidence", "ulira",
           # causal LMs
           "answer_nll", "perplexity", "token_logprobs", "greedy_answers", "qa_accuracy", "qa_rouge", "rouge_l_recall",
           "rouge_tokenize", "verbatim_rouge", "truth_ratio", "truth_ratio_forget_score", "truth_ratio_retain_score",
           "forget_quality", "extraction_strength", "mia_loss", "mia_zlib", "mia_min_k", "mia_min_k_plus_plus",
           "mia_gradnorm", "per_sample_loop_gradnorm", "mia_auc", "privleak", "evaluate_lm"]
