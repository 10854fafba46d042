"""CODA-Prompt: COntinual Decomposed Attention-based Prompting for Rehearsal-Free Continual Learning (Smith,
Karlinsky, Gutta, Cascante-Bonilla, Kim, Arbelle, Panda, Feris, Kira; CVPR 2023).

Idea: instead of picking prompts from a pool, every image gets its own prompt per block l, a weighted sum of
learned components P_lm. The weight of component m is cos(q * A_lm, K_lm): the query q ([CLS] feature of a frozen,
prompt-free pass of the ViT) is masked by the component's attention vector A_lm and compared with its key K_lm,
so the whole selection is differentiable and trained end to end with CE. The `prompt_pool` components are split
evenly over the tasks: each task adds its slice, initialised orthonormal to the previous components (Gram-Schmidt),
and freezes the previous slices; `ortho_weight` * sum_l ||M M^T - I||^2 (mean) over K_l, A_l and P_l keeps the
components orthogonal. CE covers the current task's classes only. No replay.

Deviations:
- The slices are created in `before_task` (checkpoint rule: modules only there), and the old ones are frozen
  with requires_grad rather than detached in the forward, so that weight decay cannot move them either.
- A pool that does not divide by the number of tasks is split as evenly as possible (the paper assumes it does).
- `prompt_length` counts prefix tokens per key and per value: the paper's length 8 is split into 4 key and
  4 value tokens by the authors' code, i.e. `prompt_length: 4` here.
- Unlike the original, `backbone`, `pretrained` and `pretrain_path` are honoured (any timm ViT, local weights).
"""
from dataclasses import dataclass

from backbone.prompt import CodaComponents
from methods import register_method
from methods.base import PromptMethod
from utils.config import key
from utils.registry import UserError


@dataclass(frozen=True)
class CodaPromptConfig:
    prompt_pool: int = key(100, "prompt components in all, split evenly over the tasks", range="[1, inf)")
    prompt_length: int = key(4, "prefix tokens per component and block (the paper's length 8 counts key + value)",
                             range="[0, inf)")
    prompt_layers: list[int] = key([0, 1, 2, 3, 4], "ViT blocks that receive the prompts", range="[0, inf)")
    ortho_weight: float = key(0.0, "weight of the orthogonality penalty on keys, attention vectors and prompts",
                              range="[0, inf)")


@register_method("coda_prompt", config=CodaPromptConfig)
class CodaPrompt(PromptMethod):
    def __init__(self, cfg, data):
        super().__init__(cfg, data)
        vit = self.vit
        if not len(data.tasks) <= cfg.prompt_pool <= vit.embed_dim:
            raise UserError(f"prompt_pool must lie between the number of tasks ({len(data.tasks)}) and the ViT width "
                            f"({vit.embed_dim}) so that every task gets orthogonal components, got {cfg.prompt_pool}")
        if cfg.prompt_length < 1:
            raise UserError(f"prompt_length must be at least 1, got {cfg.prompt_length}")
        self.prompt = CodaComponents(cfg.prompt_length, vit.check_layers("prompt_layers", cfg.prompt_layers),
                                     vit.embed_dim)

    def before_task(self, task):
        start, end = (self.cfg.prompt_pool * t // task.n_tasks for t in (task.index, task.index + 1))
        self.prompt.add_components(end - start)

    def prompted(self, x, train):
        """Logits of the pass with the prompt the query's attention weights make of the components."""
        return self.network.fc(self.vit(x, self.prompt(self.vit.query(x)))), None

    def prompt_losses(self, _):
        return {"ortho": self.cfg.ortho_weight * self.prompt.orthogonality()} if self.cfg.ortho_weight else {}
