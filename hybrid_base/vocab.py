"""Raw-value alignment of two vocabularies — the pure logic behind ``FeatureMap.align``.

It lives here (not in ``hybrid.data``) because the transfer adapters need it and may not import ``hybrid``.
It works on token lists and on the JSON form of a feature map (``FeatureMap.to_dict()``, also stored in
every checkpoint manifest), so callers need no ``FeatureMap`` object.

Ids follow :mod:`hybrid_base.ids`: ``0`` padding, ``1`` OOV, the token at position ``i`` has id
``i + NUM_RESERVED_IDS``.

Example:
    >>> align_tokens(["y", "z", "x"], ["x", "y"]).tolist()    # target ids 2..4 are y, z, x
    [0, 1, 3, -1, 2]
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from hybrid_base.ids import NUM_RESERVED_IDS


def align_tokens(target_tokens: Sequence[str] | pd.Index, source_tokens: Sequence[str] | pd.Index) -> np.ndarray:
    """For each target id, the source id of the same raw value, ``-1`` where the source lacks it.

    Args:
        target_tokens: raw values of the target vocabulary in id order (id ``i + 2`` for position ``i``).
        source_tokens: the same for the source vocabulary (a ``pd.Index`` is used as is, so callers that
            keep one avoid rebuilding it).

    Returns:
        int64 ``[len(target_tokens) + NUM_RESERVED_IDS]``; reserved ids map to themselves.
    """
    source = source_tokens if isinstance(source_tokens, pd.Index) else pd.Index(list(source_tokens), dtype=object)
    positions = source.get_indexer(pd.Index(list(target_tokens), dtype=object))
    mapped = np.where(positions < 0, -1, positions + NUM_RESERVED_IDS)
    return np.concatenate([np.arange(NUM_RESERVED_IDS), mapped]).astype(np.int64)


def vocabulary_tokens(feature_map: Mapping, feature: str) -> list[str]:
    """Tokens (id order) of ``feature`` in a feature map's dict form, following its ``shared`` links.

    Raises:
        KeyError: naming the feature and the features the map has.
    """
    vocabularies = feature_map.get("vocabularies", {})
    base = feature_map.get("shared", {}).get(feature, feature)
    if base not in vocabularies:
        known = sorted(vocabularies) + sorted(feature_map.get("shared", {}))
        raise KeyError(f"feature map has no feature '{feature}' (known: {', '.join(known)})")
    return list(vocabularies[base]["tokens"])


def align_feature_maps(target: Mapping, source: Mapping, feature: str, source_feature: str | None = None) -> np.ndarray:
    """:func:`align_tokens` for two feature maps in dict form (``FeatureMap.to_dict()``).

    Args:
        target: the map whose ids index the result.
        source: the map whose ids the result holds.
        feature: feature of ``target``; ``source_feature`` (default: the same name) of ``source``.
    """
    return align_tokens(vocabulary_tokens(target, feature), vocabulary_tokens(source, source_feature or feature))
