"""Scoring predictions: the paper's metrics, leave-one-section-out cross-validation
(``mclx evaluate``) and the analyses of a prediction (``mclx analyze``)."""

from __future__ import annotations
