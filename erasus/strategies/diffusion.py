"""Concept erasure for diffusion models (task ``"diffusion"``), written from the papers: ESD (Gandikota et al.,
ICCV 2023), fine-tuning against the frozen model's negatively guided noise, and UCE (Gandikota et al., WACV 2024),
a closed-form edit of the cross-attention projections. Both change the model in place."""
from __future__ import annotations

import torch
from torch import nn

from erasus.errors import EmptyInputError, InvalidInputError
from erasus.strategies.base import GradientStrategy, Strategy, _nonnegative, _positive
from erasus.strategies.guard import GuardTripped, TrainingGuard
from erasus.tasks import infer_task
from erasus.tasks.diffusion import cross_attention_layers

ESD_VARIANTS = ("esd-x", "esd-u", "esd-all", "esd-x-strict")


def _require_cross_attention(model: nn.Module) -> list[tuple[str, nn.Module]]:
    unet = getattr(model, "unet", None)
    if unet is None:
        raise InvalidInputError(f"model must be a concept diffusion model with a .unet (erasus.data.diffusion_data."
                                f"ConceptDiffusion), got {type(model).__name__}")
    layers = cross_attention_layers(unet)
    if not layers:
        raise InvalidInputError(f"model: the UNet ({type(unet).__name__}) has no cross-attention layers (attn2) "
                                "to erase a concept from")
    return layers


class ESD(GradientStrategy, name="esd"):
    """Erased Stable Diffusion: fine-tune the model so that under the erased concept c it predicts the frozen
    original θ*'s negatively guided noise,

    ``ε_θ(x_t, c, t) → ε*(x_t, ∅, t) − eta [ε*(x_t, c, t) − ε*(x_t, ∅, t)]``  (MSE),

    so that sampling with c (classifier-free guidance included) is steered away from the concept. ``x_t`` is the
    forget images forward-noised with the batch's noise at the batch's timestep (the data is at hand in
    unlearning; the paper samples x_t with the frozen model instead, which needs no data).

    Args:
        variant: which parameters train (the paper's names): ``"esd-x"`` the cross-attention layers (``attn2``;
            erases the concept's prompt-specific effect), ``"esd-u"`` every UNet parameter but cross-attention
            (the "unconditional" variant, for concepts that leak without the prompt), ``"esd-all"`` the whole
            UNet, ``"esd-x-strict"`` only the cross-attention key/value projections. The concept encoder (the
            "text encoder") never trains.
        eta: the negative-guidance scale η (the paper's 1).
        retain_weight: weight of a preservation term (not in the paper, 0 by default): the MSE between the
            model's and the frozen model's noise predictions on retain batches, which holds the kept concepts.
        lr and the optimizer settings: as every gradient strategy (Adam, lr 1e-3 by default for the tiny model;
            the paper's SD setting is 1e-5).
    """

    tasks = ("diffusion",)

    def __init__(self, variant: str = "esd-x", eta: float = 1.0, **kwargs):
        kwargs.setdefault("retain_weight", 0.0)
        super().__init__(**kwargs)
        if variant not in ESD_VARIANTS:
            raise InvalidInputError(f"variant must be one of {ESD_VARIANTS}, got {variant!r}")
        _positive("eta", eta)
        self.variant, self.eta = variant, eta

    @property
    def needs_reference(self):
        return True

    def trained_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """The parameters the variant trains."""
        layers = _require_cross_attention(model)
        if self.variant == "esd-x-strict":
            chosen = {id(p) for _, m in layers for proj in (m.to_k, m.to_v) for p in proj.parameters()}
        elif self.variant == "esd-x":
            chosen = {id(p) for _, m in layers for p in m.parameters()}
        else:
            cross = {id(p) for _, m in layers for p in m.parameters()}
            chosen = {id(p) for p in model.unet.parameters() if self.variant == "esd-all" or id(p) not in cross}
        return [p for p in model.parameters() if id(p) in chosen]

    def prepare(self, model, forget, retain):
        trained = {id(p) for p in self.trained_parameters(model) if p.requires_grad}
        if not trained:
            raise InvalidInputError(f"ESD variant {self.variant!r} selects no trainable parameter of the model")
        for p in model.parameters():  # unlearn() puts every requires_grad back afterwards
            if id(p) not in trained:
                p.requires_grad_(False)

    def erase_target(self, model: nn.Module, batch) -> torch.Tensor:
        """``ε*(x_t, ∅) − eta (ε*(x_t, c) − ε*(x_t, ∅))`` from the frozen model, both branches in one call."""
        task = self.task
        null = task.with_concepts(batch, model.null_id)
        both = tuple(torch.cat(pair) for pair in zip(batch, null))
        conditional, unconditional = self.reference_outputs(model, both).chunk(2)
        return unconditional - self.eta * (conditional - unconditional)

    def method_loss(self, model, forget_batch, retain_batch):
        task = self.task
        forget_batch = task.with_noise(forget_batch)
        target = self.erase_target(model, forget_batch)
        total = task.output_kl(self.outputs(model, forget_batch), target, forget_batch).mean()
        if retain_batch is not None and self.retain_weight:
            ref = self.reference_outputs(model, retain_batch)
            total = total + self.retain_weight * task.output_kl(self.outputs(model, retain_batch), ref,
                                                                retain_batch).mean()
        return total


class UCE(Strategy, name="uce"):
    """Unified Concept Editing, training-free: every cross-attention key and value projection W (``attn2.to_k``,
    ``attn2.to_v``) is replaced by the least-squares solution

    ``W_new = (lam W + s_e Σ_E v*_i c_iᵀ + s_p Σ_P (W c_j) c_jᵀ) (lam I + s_e Σ_E c_i c_iᵀ + s_p Σ_P c_j c_jᵀ)⁻¹``

    which maps each erased concept's embedding c_i to ``v*_i = W c_guide`` (what the layer gave the guide concept)
    while keeping the outputs of the preserved embeddings c_j, and stays near W (``lam``). The embeddings are the
    concept tokens the UNet reads (``model.concept_embeddings``). Changes the model in place; one pass, no data
    beyond the concept names (the forget set's concepts when ``concepts`` is None); ``epochs`` is ignored.

    Args:
        concepts: the concepts to erase (names such as ``"three"`` or ids); None takes the forget set's.
        guide: the concept each is mapped to: ``"null"`` (default: the unconditional token, so the erased prompt
            generates like the empty prompt) or a concept name/id.
        preserve: concepts whose outputs are kept; None keeps every concept not erased. The null token and the
            start token (in every prompt) are always preserved.
        lam, erase_scale, preserve_scale: λ, s_e and s_p of the paper (0.5, 1, 1).
    """

    training_free = True
    tasks = ("diffusion",)

    def __init__(self, concepts=None, guide: str | int = "null", preserve=None, lam: float = 0.5,
                 erase_scale: float = 1.0, preserve_scale: float = 1.0):
        _positive("lam", lam)
        _positive("erase_scale", erase_scale)
        _nonnegative("preserve_scale", preserve_scale)
        if concepts is not None and not isinstance(concepts, (str, int)) and len(list(concepts)) == 0:
            raise EmptyInputError("concepts is empty: name at least one concept to erase (or None for the forget "
                                  "set's)")
        self.concepts = concepts if concepts is None or isinstance(concepts, (str, int)) else list(concepts)
        self.guide = guide
        self.preserve = preserve if preserve is None or isinstance(preserve, (str, int)) else list(preserve)
        self.lam, self.erase_scale, self.preserve_scale = lam, erase_scale, preserve_scale

    def unlearn(self, model, forget=None, retain=None, *, epochs=1, original=None, on_step=None, on_epoch=None,
                guard=None, task=None, reference=None):
        task = infer_task(model, task if task is not None else "diffusion")
        self.check_task(task)
        layers = _require_cross_attention(model)
        erase = self.erased_ids(model, forget)
        guide = self._guide_id(model)
        preserve = self.preserved_ids(model, erase)
        guard = guard or TrainingGuard(model)
        edited = self.edit(model, layers, erase, guide, preserve)
        log = {"steps": 0, "stopped": None, "edited_projections": edited, "erased": erase.tolist(),
               "guide": guide, "preserved": preserve.tolist()}
        try:
            guard.check(torch.tensor(0.0))
        except GuardTripped as exc:
            log["stopped"] = str(exc)
        return log

    def erased_ids(self, model, forget) -> torch.Tensor:
        """The ids to erase: ``concepts``, or every concept id in the forget data (batches or samples)."""
        if self.concepts is not None:
            return model.concept_ids(self.concepts, argument="concepts")
        if forget is None:
            raise EmptyInputError("UCE needs concepts= or forget data to know what to erase")
        found = set()
        for item in forget:
            found.update(torch.as_tensor(item[1]).reshape(-1).tolist())
        if not found:
            raise EmptyInputError("forget holds no samples: nothing to erase")
        return model.concept_ids(sorted(found), argument="forget concept ids")

    def _guide_id(self, model) -> int:
        from erasus.data.diffusion_data import NULL_CONCEPT

        if self.guide == NULL_CONCEPT:
            return model.null_id
        return int(model.concept_ids(self.guide, argument="guide")[0])

    def preserved_ids(self, model, erase: torch.Tensor) -> torch.Tensor:
        if self.preserve is None:
            keep = [i for i in range(len(model.concept_names)) if i not in set(erase.tolist())]
        else:
            keep = model.concept_ids(self.preserve, argument="preserve").tolist()
            overlap = sorted(set(keep) & set(erase.tolist()))
            if overlap:
                raise InvalidInputError(f"preserve and concepts share {[model.concept_names[i] for i in overlap]}: "
                                        "a concept cannot be both erased and preserved")
        return torch.tensor(sorted(set(keep)) + [model.null_id], dtype=torch.int64)

    @torch.no_grad()
    def edit(self, model, layers, erase: torch.Tensor, guide: int, preserve: torch.Tensor) -> int:
        """Replace every cross-attention ``to_k`` / ``to_v`` weight by UCE's closed form, in place; returns how
        many projections were edited. Solved in float64."""
        table = model.concept_embeddings.weight.detach().double().cpu()
        erased = table[erase]                                                  # (nE, d)
        kept = torch.cat([table[preserve], model.start_token.detach().double().cpu()[None]])  # (nP, d)
        guide_vec = table[guide]
        d = table.shape[1]
        # The right-hand factor is the same for every projection: λI + s_e Σ c_i c_iᵀ + s_p Σ c_j c_jᵀ.
        gram = self.lam * torch.eye(d, dtype=torch.float64) + self.erase_scale * erased.T @ erased + \
            self.preserve_scale * kept.T @ kept
        edited = 0
        for _, attention in layers:
            for proj in (attention.to_k, attention.to_v):
                w = proj.weight.detach().double().cpu()                       # (out, d)
                targets = (w @ guide_vec).expand(len(erased), -1)              # v*_i = W c_guide, (nE, out)
                rhs = self.lam * w + self.erase_scale * targets.T @ erased + self.preserve_scale * (w @ kept.T) @ kept
                new = torch.linalg.solve(gram, rhs.T).T                        # rhs · gram⁻¹ (gram is symmetric)
                proj.weight.copy_(new.to(proj.weight.device, proj.weight.dtype))
                edited += 1
        return edited
