"""Model families: what the orchestrator and the strategies need to know about classifiers, causal LMs, CLIP
and diffusion models.
``TASKS`` maps a name to its class; ``infer_task(model)`` picks one from the model."""
from erasus.tasks.base import TASKS, Task, get_task, infer_task, is_causal_lm, unwrap
from erasus.tasks.causal_lm import CausalLM
from erasus.tasks.classification import Classification
from erasus.tasks.clip import CLIPTask
from erasus.tasks.diffusion import Diffusion
from erasus.tasks.reference import Reference

__all__ = ["TASKS", "Task", "get_task", "infer_task", "is_causal_lm", "unwrap", "Classification", "CausalLM", "CLIPTask", "Diffusion",
           "Reference"]
