"""A user's strategy with a setting of its own, registered from outside pkdpipe: the CLI loads it
through $PKDPIPE_PLUGINS (tests/test_plugin_strategy.py). Written as a user would, against the
public seam only: `setting`, `Strategy`, `register`."""

from dataclasses import dataclass

import torch.nn.functional as F

from pkdpipe import strategies
from pkdpipe.settings import setting
from pkdpipe.strategies import StepSpec, Strategy, model_inputs


@dataclass(frozen=True)
class MineSettings:
    my_setting: float = setting(0.2, "Weight of the soft labels against CE (mine's own).", sweep=True)
    my_sharpness: float = setting(2.0, "Temperature of mine's soft labels.", sweep=True, tag="sh")


def mine_step(spec: StepSpec):
    settings = spec.values  # a MineSettings

    def step(model, batch):
        logits = model(**model_inputs(batch)).logits
        ce = F.cross_entropy(logits, batch["labels"])
        t = settings.my_sharpness
        soft = F.kl_div(
            F.log_softmax(logits / t, -1), F.log_softmax(batch["teacher_logits"] / t, -1), log_target=True,
            reduction="batchmean",
        )  # fmt: skip
        weight = logits.new_tensor(settings.my_setting)  # logged, so a test sees the value that was used
        return {"loss": ce + weight * soft, "ce": ce, "soft": soft, "weight": weight}

    return step


MINE = strategies.register(
    Strategy(
        "mine", "CE + my_setting x soft labels", ("loss", "ce", "soft", "weight"), MineSettings, mine_step
    )
)
