"""DualPrompt: Complementary Prompting for Rehearsal-free Continual Learning (Wang, Zhang, Ebrahimi, Sun, Zhang,
Lee, Ren, Su, Perot, Dy, Pfister; ECCV 2022).

Idea: a frozen pre-trained ViT receives two kinds of prefix prompts. One G(eneral)-prompt, shared by all tasks,
goes into the blocks `g_layers`; one E(xpert)-prompt per task, each with a learnable key, goes into the blocks
`e_layers`. Training on task t uses E-prompt t and pulls its key towards the queries ([CLS] feature of a frozen,
prompt-free pass) with `pull_weight` * (1 - cos(query, key_t)); CE masks the logits of other tasks' classes.
At test time the E-prompt whose key is closest to the query is used (top-1), and its index is reported as the
predicted task ("task_id", scored by the evaluation as task-id accuracy). No replay.

Deviations:
- At test time the key is matched among the tasks seen so far, not the whole pool (unseen keys are untrained).
- Prompt lengths count prefix tokens per key and per value, as in the paper; the original split one length
  into key and value halves.
- Unlike the original, `backbone`, `pretrained` and `pretrain_path` are honoured (any timm ViT, local weights).
"""
from dataclasses import dataclass

import torch

from backbone.prompt import PromptPool, concat_prefixes
from methods import register_method
from methods.base import PromptMethod
from utils.config import key
from utils.losses import key_matching_loss
from utils.registry import UserError


@dataclass(frozen=True)
class DualPromptConfig:
    g_prompt_length: int = key(5, "prefix tokens of the shared G-prompt per block", range="[0, inf)")
    g_layers: list[int] = key([0, 1], "ViT blocks that receive the G-prompt", range="[0, inf)")
    e_prompt_pool: int = key(10, "number of E-prompts (and keys); at least the number of tasks",
                              range="[1, inf)")
    e_prompt_length: int = key(5, "prefix tokens of an E-prompt per block", range="[0, inf)")
    e_layers: list[int] = key([2, 3, 4], "ViT blocks that receive the E-prompt", range="[0, inf)")
    pull_weight: float = key(1.0, "weight of the key-matching loss 1 - cos(query, key of the task)",
                              range="[0, inf)")


@register_method("dual_prompt", config=DualPromptConfig)
class DualPrompt(PromptMethod):
    def __init__(self, cfg, data):
        super().__init__(cfg, data)
        vit = self.vit
        if cfg.e_prompt_pool < len(data.tasks):
            raise UserError(f"e_prompt_pool ({cfg.e_prompt_pool}) must be at least the number of tasks "
                            f"({len(data.tasks)}): each task trains its own E-prompt")
        self.g_prompt = PromptPool(1, cfg.g_prompt_length, vit.check_layers("g_layers", cfg.g_layers), vit.embed_dim,
                                   keyed=False)
        self.e_prompts = PromptPool(cfg.e_prompt_pool, cfg.e_prompt_length, vit.check_layers("e_layers", cfg.e_layers),
                                    vit.embed_dim)

    def prompted(self, x, train):
        """Logits with the G-prompt and an E-prompt: in training the task's own (and the cosine of the query to
        its key), at test the one whose key is closest to the query among the seen tasks' (and its index)."""
        if train:
            task_ids = torch.full((len(x), 1), self.task.index, device=x.device)
            aux = self.e_prompts.similarity(self.vit.query(x)).gather(1, task_ids)
        else:
            task_ids, _ = self.e_prompts.match(self.vit.query(x), 1, among=self.task.index + 1)
            aux = task_ids[:, 0]
        prefixes = concat_prefixes(self.g_prompt(torch.zeros_like(task_ids)), self.e_prompts(task_ids))
        return self.network.fc(self.vit(x, prefixes)), aux

    def prompt_losses(self, cos):
        return {"pull": self.cfg.pull_weight * key_matching_loss(cos)}

    def predict(self, x):
        """The seen classes' scores, and the task whose E-prompt was used (scored as task-id accuracy)."""
        logits, task_id = self.prompted(x, train=False)
        return {"cnn": logits[:, : self.task.total], "task_id": task_id}
