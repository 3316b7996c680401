"""Membership inference for unlearning: SalUn's population MIA-efficacy."""
from __future__ import annotations

import torch
from torch import nn

from erasus.errors import EmptyInputError
from erasus.metrics.accuracy import predict_logits


def true_class_confidence(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.float(), dim=1).gather(1, labels.long()[:, None]).squeeze(1)


def mia_efficacy(model: nn.Module, retain, test, forget) -> float:
    """SalUn's MIA-Efficacy (Fan et al. 2024, ``evaluation/SVC_MIA.py``, "confidence"): an RBF SVC
    (C = 3, gamma = "auto") on the softmax probability of the true class, trained to tell the first
    ``len(test)`` retain samples (members) from the test samples (non-members), then applied to the forget
    set. Returns the fraction of the forget set called non-member, in [0, 1]: higher reads "more forgotten",
    but the target is the retrained model's value, not 1.
    """
    from sklearn.svm import SVC

    retain_conf = true_class_confidence(*predict_logits(model, retain))
    test_conf = true_class_confidence(*predict_logits(model, test))
    forget_conf = true_class_confidence(*predict_logits(model, forget))
    if len(test_conf) == 0 or len(forget_conf) == 0:
        raise EmptyInputError("test and forget sets must be non-empty")
    members = retain_conf[: len(test_conf)]
    features = torch.cat([members, test_conf]).double().numpy()[:, None]
    labels = [1] * len(members) + [0] * len(test_conf)
    clf = SVC(C=3, gamma="auto", kernel="rbf").fit(features, labels)
    predicted = clf.predict(forget_conf.double().numpy()[:, None])
    return float((predicted == 0).mean())
