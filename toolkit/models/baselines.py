"""Training-free baselines on the image encoder's pooled features (issue #17).

- :class:`KNN` (``--model knn``): no training. Its bank holds the *raw* pooled features
  of the bank spots' patches (registered with ``bank_source="image"``), and a query patch is matched
  against them with mclSTExp's retrieval (cosine top-k, inverse-square L2 weights, k 200).
- :class:`RidgeProbe` (``--model ridge``): HEST-Bench's linear probe, PCA to 256
  components then ridge regression to the G genes, fitted in closed form by
  scikit-learn, with ``alpha`` chosen by cross-validation over the *training* sections
  (GroupKFold, one group per section). The fitted PCA and ridge live in the state dict
  as tensors, so the model is a plain module: ``encoder -> (x - mean) @ components.T ->
  @ coef.T + intercept`` (one ONNX graph on export).

Both fit through :meth:`fit_features` (pooled features of a frozen encoder, the training
table) instead of gradient steps; :func:`mclx.training.run.train_model` calls it.
"""

from __future__ import annotations

import dataclasses
import tempfile
from typing import Any

import numpy as np
import torch
from torch import nn

from mclx.config import ModelCfg
from mclx.models.backbones import encode, feature_width

# ridge penalties tried by the inner cross-validation (features are not standardised:
# a wide grid covers encoders whose features differ in scale by orders of magnitude)
ALPHAS = tuple(float(a) for a in np.logspace(-2, 6, 9))


class KNN(nn.Module):
    """Retrieval on raw pooled features: the encoder is the whole model."""

    kind = "contrastive"  # predicts by retrieval from a bank (of image features: the
    # registry's bank_source="image")

    def __init__(self, cfg: ModelCfg, image_encoder: nn.Module) -> None:
        super().__init__()
        self.cfg = cfg
        self.image_encoder = image_encoder

    def embed_image_features(self, feats: torch.Tensor) -> torch.Tensor:
        return feats

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return encode(self.image_encoder, images)

    def fit_features(self, feats: np.ndarray, table: Any) -> dict[str, Any]:
        """Nothing to learn: the bank is the training spots' features."""
        return {"history": [0.0], "n_fit_spots": int(len(feats))}


class RidgeProbe(nn.Module):
    """PCA (``cfg.embed_dim`` components) + ridge regression on pooled features."""

    kind = "regression"

    def __init__(self, cfg: ModelCfg, image_encoder: nn.Module) -> None:
        super().__init__()
        self.cfg = cfg
        self.image_encoder = image_encoder
        f, c, g = feature_width(cfg, image_encoder), cfg.embed_dim, cfg.n_genes
        self.register_buffer("mean", torch.zeros(f))
        self.register_buffer("components", torch.zeros(c, f))
        self.register_buffer("coef", torch.zeros(g, c))
        self.register_buffer("intercept", torch.zeros(g))
        self.register_buffer("alpha", torch.zeros(()))

    def embed_image_features(self, feats: torch.Tensor) -> torch.Tensor:
        """Pooled features (N, F) -> predicted expression (N, G)."""
        z = (feats - self.mean) @ self.components.T
        return z @ self.coef.T + self.intercept

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed_image_features(encode(self.image_encoder, images))

    def fit_features(self, feats: np.ndarray, table: Any) -> dict[str, Any]:
        """Fit PCA + ridge on ``feats`` (N, F) -> ``table.expr`` (N, G); alpha by
        GroupKFold cross-validation over ``table``'s sections (needs two or more)."""
        pipe, search = fit_pca_ridge(
            np.asarray(feats, np.float64),
            np.asarray(table.expr, np.float64),
            np.asarray(table.section).astype(str),
            n_components=self.cfg.embed_dim,
        )
        pca, ridge = pipe.named_steps["pca"], pipe.named_steps["ridge"]
        n = pca.components_.shape[0]
        if n != self.cfg.embed_dim:  # fewer spots or features than components asked for
            self.cfg = dataclasses.replace(self.cfg, embed_dim=n)
        as_t = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32)  # noqa: E731
        self.mean, self.components = as_t(pca.mean_), as_t(pca.components_)
        self.coef, self.intercept = as_t(ridge.coef_), as_t(ridge.intercept_)
        self.alpha = as_t(ridge.alpha)
        mse = -np.asarray(search.cv_results_["mean_test_score"], np.float64)
        return {
            "history": [float(mse.min())],
            "ridge_alpha": float(ridge.alpha),
            "ridge_cv": {"alphas": list(ALPHAS), "mse": mse.tolist(), "folds": search.n_splits_},
            "pca_components": int(n),
        }


def fit_pca_ridge(
    x: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray,
    *,
    n_components: int = 256,
    alphas: tuple[float, ...] = ALPHAS,
):
    """scikit-learn ``Pipeline(PCA, Ridge)`` refitted on all of ``x`` at the alpha of
    lowest mean squared error over GroupKFold folds of ``groups`` (PCA refitted inside
    every fold, so no fold sees its validation spots). Returns (pipeline, search)."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge
    from sklearn.model_selection import GridSearchCV, GroupKFold
    from sklearn.pipeline import Pipeline

    n_groups = len(set(groups.tolist()))
    if n_groups < 2:
        msg = (
            "ridge chooses its alpha by cross-validation over training sections: "
            f"it needs at least two, got {n_groups}"
        )
        raise ValueError(msg)
    n = min(n_components, x.shape[1], *(int((groups != g).sum()) for g in set(groups.tolist())))
    with tempfile.TemporaryDirectory(prefix="mclx-ridge-") as cache:
        # memory: each fold's PCA is fitted once and reused for every alpha (the same
        # fitted transformer, 9x fewer SVDs), then dropped with the folder
        steps = [("pca", PCA(n_components=n, svd_solver="full")), ("ridge", Ridge())]
        pipe = Pipeline(steps, memory=cache)
        search = GridSearchCV(
            pipe,
            {"ridge__alpha": list(alphas)},
            cv=GroupKFold(n_splits=min(5, n_groups)),
            scoring="neg_mean_squared_error",
            refit=True,
        )
        search.fit(x, y, groups=groups)
    best = search.best_estimator_
    best.memory = None  # its cache folder is gone
    return best, search
