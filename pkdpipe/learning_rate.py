"""`--lr auto`, the default learning rate of `finetune` and `distill`: a number chosen from the
depth and width of the model being trained, and the rule that chose it.

Why not the paper's 5e-5: that is the grid Sun et al. (2019) tuned for BERT-base (12 layers, hidden
768). On this project's own measurements every small model wanted far more:
- BANKING77, 3-layer all-MiniLM-L6-v2 students (hidden 384): lr 1e-4 gave KD 64.6 on test,
  lr 3e-4 gave 82.8; the demo's PKD-Skip student used 5e-4 (test 88.96; 2e-4 left it at 84.4 after
  4 epochs, still rising); the README's next step at 5e-5 stopped at 53.63 dev (issue 30).
- TREC, MPNet 12 -> 3 (hidden 768): lr 1e-4 gave KD 83.3, lr 3e-4 gave 91.5.
- The README's MiniLM tables: 14 of 16 tuned rows chose the grid's higher point, 3e-4.
- The demo's teacher, the 6-layer all-MiniLM-L6-v2 fine-tuned at 3e-4: test 90.91.
No measurement here says what a 12-layer BERT-base wants better than the paper does, so a model of
its size keeps 5e-5. The rule is a table, not a fit: each row names the measurement it rests on,
and a depth or width between rows takes the row above it (the shallower model's lr is higher).
An explicit `--lr X` always wins; this only fills in the default.
"""

from __future__ import annotations

AUTO = "auto"

# (at most this many trained layers, at most this hidden size, lr, the measurement it rests on)
RULES: tuple[tuple[int, int, float, str], ...] = (
    (4, 384, 5e-4, "a 3-layer MiniLM (hidden 384) student: the demo's 5e-4, test 88.96"),
    (4, 10**9, 3e-4, "a 3-layer student: MPNet 12->3 on TREC, 3e-4 -> 91.5 vs 1e-4 -> 83.3"),
    (8, 10**9, 3e-4, "a 4-8-layer model: the demo's 6-layer MiniLM teacher at 3e-4, test 90.91"),
    (12, 512, 1e-4, "a 9-12-layer narrow model: between the small models' 3e-4 and BERT-base's 5e-5"),
    (10**9, 10**9, 5e-5, "a BERT-base-sized model: the PKD paper's grid for BERT-base"),
)


def auto_lr(layers: int, hidden: int) -> tuple[float, str]:
    """The learning rate `--lr auto` gives a model of `layers` trained layers and `hidden` width,
    and the rule that chose it, in words (recorded in the run's settings and card)."""
    for max_layers, max_hidden, lr, why in RULES:
        if layers <= max_layers and hidden <= max_hidden:
            return lr, f"--lr auto: {lr:g} for {layers} layers, hidden {hidden} ({why})"
    raise AssertionError("the last rule takes every model")  # pragma: no cover


def resolve(lr: float | str, layers: int, hidden: int) -> tuple[float, str | None]:
    """The number a run trains with: `lr` itself when given, else `auto_lr`'s; and the rule (None
    when the user chose the number)."""
    if lr != AUTO:
        return float(lr), None
    return auto_lr(layers, hidden)
