"""Training: determinism, loss going down, real-data run on two HER2+ sections."""

import numpy as np
import pytest
from helpers import needs, tiny_model, tiny_recipe

from mclx.training.features import PatchCache
from mclx.training.run import train_model


def test_seeded_runs_are_identical(synthetic):
    h1 = tiny_model(synthetic, epochs=6).history
    h2 = tiny_model(synthetic, epochs=6).history
    h3 = tiny_model(synthetic, epochs=6, seed=1).history
    assert h1 == h2 and h1 != h3


@pytest.mark.parametrize("context", ["batch", "section"])
def test_finetuning_encoder_with_augmentation_lowers_loss(synthetic, context):
    tiny = tiny_model(
        synthetic, train=False, epochs=3, batch_size=64, lr=1e-3, frozen=False, context=context
    )
    net = tiny.net
    assert net.cfg.context == context
    before = {k: v.clone() for k, v in net.image_encoder.state_dict().items()}
    history, _ = train_model(
        net,
        PatchCache(tiny.adatas, tiny.pre.patch_size),
        tiny.sections,
        tiny.pre,
        tiny.recipe.train,
        progress=False,
    )
    assert history[-1] < history[0]
    after = net.image_encoder.state_dict()
    assert any(not (before[k] == after[k]).all() for k in before)  # the encoder trained


@needs("her2st")
@pytest.mark.slow
def test_real_two_section_run_improves_contrastive_loss(her2st):
    # the reference recipe (batch 128, her2st's gene list), DenseNet-121 without weights
    recipe = tiny_recipe(her2st, encoder="densenet121", epochs=15, batch_size=128)
    trained = tiny_model(her2st, ["C3", "C4"], recipe=recipe)
    history, table = trained.history, trained.table
    assert len(table) == 364 and table.expr.shape[1] == 785
    assert np.isfinite(history).all()
    assert np.mean(history[-3:]) < 0.9 * history[0], history
