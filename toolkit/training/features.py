"""Patches and frozen-encoder features, computed once per section and reused: the
cache a training run (and every fold of ``mclx evaluate``) reads its inputs from.

A patch covers ``patch_size`` pixels at the model's µm/px, resampled from each section's
own image (:func:`mclx.data.patches.section_patches`); features are cached per encoder
and weights (:func:`encoder_fingerprint`), pooled, per token, or per dihedral view.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mclx.config import PreprocessCfg
from mclx.data.dataset import SpotTable, build_table
from mclx.data.patches import section_patches, source_size

FEATURE_VIEWS = (1, 8)  # the patch as cut; its 8 dihedral views


class PatchCache:
    """Patches cut once per section and µm/px, and frozen-encoder features once per
    encoder: a patch covers ``patch_size`` pixels at the model's µm/px (``pre.mpp``),
    resampled from each section's own image."""

    def __init__(self, adatas: Mapping[str, Any], patch_size: int) -> None:
        self.adatas = adatas
        self.patch_size = patch_size
        self._patches: dict[tuple[str, int], np.ndarray] = {}
        self._features: dict[tuple[str, str, str, int, bool], np.ndarray] = {}

    def _source(self, section: str, mpp: float | None, fov_um: float = 0.0) -> int:
        """Level-0 pixels a patch covers: ``patch_size`` at ``mpp``, or ``fov_um`` µm."""
        a = self.adatas[section]
        return source_size(self.patch_size, mpp, a.uns.get("mpp"), str(a.uns.get("image_path")),
                           fov_um)  # fmt: skip

    def patches(self, section: str, mpp: float | None = None, fov_um: float = 0.0) -> np.ndarray:
        """``section``'s patches at ``mpp`` µm/px, or covering ``fov_um`` µm (the wider
        field of view) resized to ``patch_size``; cached by the pixels they cover."""
        key = (section, self._source(section, mpp, fov_um))
        if key not in self._patches:
            a = self.adatas[section]
            self._patches[key] = section_patches(a, self.patch_size, mpp, fov_um)
        return self._patches[key]

    def table(self, sections: Sequence[str], pre: PreprocessCfg) -> SpotTable:
        table = build_table({s: self.adatas[s] for s in sections}, pre, counts=True)
        table.patches = np.concatenate([self.patches(s, pre.mpp) for s in sections])
        return table

    def features(
        self,
        encoder,
        section: str,
        pre,
        *,
        tokens: bool = False,
        views: int = 1,
        fov_um: float = 0.0,
        **kw: Any,
    ) -> np.ndarray:
        """Pooled features (N, F), or with ``tokens`` every token (N, T, F), or with
        ``views = 8`` the pooled features of the 8 dihedral views (N, 8, F; view 0 the
        patch as cut) of ``section``'s patches, cached per encoder and weights (pooled
        features are the mean of cached tokens when those are there). With ``fov_um``,
        those of the patches covering ``fov_um`` µm instead (a separate entry)."""
        from mclx.inference.embed import encode_features

        if views != 1:
            return self._views(encoder, section, pre, views, fov_um, **kw)
        fp = (type(encoder).__name__, encoder_fingerprint(encoder))
        where = (section, self._source(section, pre.mpp, fov_um))
        key = (*fp, *where, tokens)
        if not tokens and (*fp, *where, True) in self._features:
            return self._features[(*fp, *where, True)].mean(axis=1)
        if key not in self._features:
            kind, desc = ("tokens" if tokens else "pooled"), f"encode {section}"
            desc += f" ({fov_um:g} µm field)" if fov_um else ""

            def encode() -> np.ndarray:
                patches = self.patches(section, pre.mpp, fov_um)
                return encode_features(encoder, patches, pre, tokens=tokens, desc=desc, **kw)

            self._features[key] = self._stored(encoder, section, pre, kind, encode, fov_um)
        return self._features[key]

    def _views(
        self, encoder, section: str, pre, views: int, fov_um: float = 0.0, **kw: Any
    ) -> np.ndarray:
        from mclx.inference.embed import encode_features

        if views not in FEATURE_VIEWS:
            msg = f"feature views must be one of {', '.join(map(str, FEATURE_VIEWS))}, not {views}"
            raise ValueError(msg)
        fp = (type(encoder).__name__, encoder_fingerprint(encoder))
        key = (*fp, section, self._source(section, pre.mpp, fov_um), f"views{views}")
        if key not in self._features:

            def encode() -> np.ndarray:
                patches = self.patches(section, pre.mpp, fov_um)
                parts = [self.features(encoder, section, pre, fov_um=fov_um, **kw)]  # as cut
                for i in range(1, views):
                    desc = f"encode {section} view {i + 1}/{views}"
                    parts.append(
                        encode_features(encoder, dihedral(patches, i), pre, desc=desc, **kw)
                    )
                return np.stack(parts, axis=1)

            kind = f"views{views}"
            self._features[key] = self._stored(encoder, section, pre, kind, encode, fov_um)
        return self._features[key]

    def _stored(
        self, encoder, section: str, pre, kind: str, encode, fov_um: float = 0.0
    ) -> np.ndarray:
        """Features of ``kind`` from the disk cache (:mod:`mclx.training.feature_store`),
        else ``encode()``d and stored there."""
        from mclx.training import feature_store as store

        key = None
        if store.enabled():  # off: not even the image is hashed
            name = f"{type(encoder).__name__}:{encoder_fingerprint(encoder)}"
            where = self._source(section, pre.mpp, fov_um)  # the wide crop: its own entry
            key = store.section_key(self.adatas[section], where, self.patch_size, name, pre, kind)
        feats = store.load(key)
        store.note(section, served=feats is not None)
        if feats is None:
            feats = encode()
            store.save(key, feats)
        return feats


def dihedral(patches: np.ndarray, i: int) -> np.ndarray:
    """View ``i`` (0-7) of the dihedral group of square patches (N, H, W, C): a rotation
    by ``i % 4`` quarter turns, then, for ``i >= 4``, a left-right flip."""
    out = np.rot90(patches, i % 4, axes=(1, 2))
    return np.ascontiguousarray(out[:, :, ::-1] if i >= 4 else out)


def encoder_fingerprint(encoder) -> str:
    from mclx.checkpoint import fingerprint

    return fingerprint(encoder.state_dict())
