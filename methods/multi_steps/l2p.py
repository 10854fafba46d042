"""L2P: Learning to Prompt for Continual Learning (Wang, Zhang, Lee, Zhang, Sun, Ren, Su, Perot, Dy, Pfister;
CVPR 2022).

Idea: a pre-trained ViT stays frozen; a pool of `prompt_pool` prompts, each with a learnable key, is shared by
all tasks. The [CLS] feature of a frozen, prompt-free pass is the query; the `top_k` keys closest to it by cosine
pick the prompts, which are inserted in the second pass, whose [CLS] feature feeds the linear head. Training
minimises CE plus `pull_weight` * sum_k (1 - cos(query, key_k)) over the selected keys, which pulls the keys
towards the queries that choose them; as in the L2P code, CE masks the logits of the classes outside the current
task. Only prompts, keys and the head train; there is no replay.

Deviations:
- Prompts are prefix key/value tokens (prefix-tuning) in the blocks of `prompt_layers` ([0]: shallow, [0..4]:
  deep), not input tokens (prompt-tuning), and the feature is the [CLS] token rather than the mean of the prompt
  outputs: the CODA-Prompt paper's "L2P++" (reported stronger than L2P there), and what the original code does.
  `prompt_length` counts prefix tokens per key and per value (the original split one length into halves).
- The original's switch `shallow_or_deep` is honoured: true puts the prompts in block 0 only (shallow, the
  input of the ViT), false in blocks 0-4 (deep, "Deep L2P++"), as the original's prompt module does; when it is
  set it decides the blocks and `prompt_layers` must be left at its default (or agree with it).
- No prompt-frequency diversification: the paper uses it only when task identity is known at training time.
- Unlike the original, `backbone`, `pretrained` and `pretrain_path` are honoured (any timm ViT, local weights).
"""
from dataclasses import dataclass
from typing import Optional

from backbone.prompt import PromptPool
from methods import register_method
from methods.base import PromptMethod
from utils.config import key
from utils.losses import key_matching_loss
from utils.registry import UserError


@dataclass(frozen=True)
class L2PConfig:
    prompt_pool: int = key(10, "number of prompts (and keys) in the pool", range="[1, inf)")
    prompt_length: int = key(5, "prefix tokens per prompt and block", range="[0, inf)")
    top_k: int = key(5, "prompts selected per image (top-N keys by cosine to the query)", range="[1, inf)")
    prompt_layers: list[int] = key([0], "ViT blocks that receive the prompts ([0]: shallow, [0..4]: deep)",
                                   range="[0, inf)")
    shallow_or_deep: Optional[bool] = key(None, "the original's switch: true = shallow (prompt_layers [0]), false = "
                                                "deep ([0, 1, 2, 3, 4]); unset: prompt_layers decides")
    pull_weight: float = key(0.1, "weight of the key-matching loss sum_k (1 - cos(query, key_k))",
                              range="[0, inf)")


SHALLOW, DEEP = [0], [0, 1, 2, 3, 4]


def prompt_layers(cfg) -> list[int]:
    """The blocks that receive the prompts: `shallow_or_deep` when set (the original's key), else `prompt_layers`."""
    if cfg.shallow_or_deep is None:
        return list(cfg.prompt_layers)
    layers = SHALLOW if cfg.shallow_or_deep else DEEP
    if list(cfg.prompt_layers) not in (SHALLOW, layers):
        raise UserError(f"shallow_or_deep: {str(cfg.shallow_or_deep).lower()} puts the prompts in blocks {layers}, but "
                        f"prompt_layers is {list(cfg.prompt_layers)}; set only one of the two")
    return list(layers)


@register_method("l2p", config=L2PConfig)
class L2P(PromptMethod):
    def __init__(self, cfg, data):
        super().__init__(cfg, data)
        vit = self.vit
        if not 1 <= cfg.top_k <= cfg.prompt_pool:
            raise UserError(f"top_k must lie in [1, prompt_pool = {cfg.prompt_pool}], got {cfg.top_k}")
        layers = vit.check_layers("prompt_layers", prompt_layers(cfg))
        self.pool = PromptPool(cfg.prompt_pool, cfg.prompt_length, layers, vit.embed_dim)

    def prompted(self, x, train):
        """Logits of the pass with the prompts of the `top_k` keys closest to the query, and those keys'
        cosine similarities."""
        idx, cos = self.pool.match(self.vit.query(x), self.cfg.top_k)
        return self.network.fc(self.vit(x, self.pool(idx))), cos

    def prompt_losses(self, cos):
        return {"pull": self.cfg.pull_weight * key_matching_loss(cos)}
