"""Training: a recipe (hyper-parameters per model), the loop, its resumable state and
data-parallel processes.

``recipe`` (what to train with) -> ``train`` (the loop) -> ``train_state`` (OUT.state,
``--resume``); ``distributed`` starts and joins the DDP processes.
"""

from __future__ import annotations
