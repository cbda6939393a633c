"""The feature map: vocabularies, reserved ids, alignment by raw id and the table naming rule — one home.

Every id a model sees comes from here, and every package (``hybrid.data``, ``hybrid.pretrain``,
``hybrid.ctr_models``, ``hybrid.adapters``) imports it from here.

* **Reserved ids**: 0 = padding (never a real value, never counted), 1 = out of vocabulary (a value not
  seen when the map was fitted); known values get ids from 2 in a stable order (most frequent first, ties
  by raw value), so fitting twice on the same data gives the same ids whatever the row order.
* **Alignment by raw id**: two maps are aligned by raw value (:meth:`FeatureMap.align`,
  :func:`align_tokens`, :func:`align_feature_maps` on the JSON form a checkpoint manifest stores), which is
  what lets pretrained tables move into a model whose ids were assigned differently.
* **Table naming**: the embedding table of base feature ``f`` is ``t_<f>`` (:func:`table_name`); a history
  sequence of ``f`` travels as KJT key ``hist_<f>`` (:func:`history_key`) and shares ``f``'s vocabulary and
  table. Pretraining, the rankers and the adapters all name tables through these functions.

A feature map is saved as JSON beside every prepared dataset, checkpoint and model.

Example:
    >>> fm = FeatureMap.fit({"item_id": pd.Series(["b", "a", "b"])})
    >>> fm["item_id"].encode(["b", "a", "zzz"]).tolist()
    [2, 3, 1]
    >>> fm.vocab_sizes()
    {'item_id': 4}
    >>> table_name("hist_item_id"), history_key("item_id"), table_feature("t_item_id")
    ('t_item_id', 'hist_item_id', 'item_id')
    >>> align_tokens(["y", "z", "x"], ["x", "y"]).tolist()    # target ids 2..4 are y, z, x
    [0, 1, 3, -1, 2]
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from hybrid.core.errors import HybridInputError

FORMAT_VERSION = 1

#: Reserved ids of every vocabulary: padding, out-of-vocabulary; known values start at ``NUM_RESERVED_IDS``.
PAD_ID = 0
OOV_ID = 1
NUM_RESERVED_IDS = 2

#: Prefix of a table name (``t_item_id``) and of a history sequence's KJT key (``hist_item_id``).
TABLE_PREFIX = "t_"
HISTORY_PREFIX = "hist_"


# -- naming ------------------------------------------------------------------------------------------------
def base_feature(key: str) -> str:
    """The base feature of a KJT key: ``"hist_item_id" → "item_id"``; other keys are returned unchanged."""
    return key[len(HISTORY_PREFIX):] if key.startswith(HISTORY_PREFIX) else key


def history_key(feature: str) -> str:
    """The KJT key of ``feature``'s history sequence: ``"item_id" → "hist_item_id"``."""
    return HISTORY_PREFIX + feature


def table_name(key: str) -> str:
    """The embedding table serving a feature or KJT key: ``"item_id"`` and ``"hist_item_id" → "t_item_id"``."""
    return TABLE_PREFIX + base_feature(key)


def table_feature(table: str) -> str:
    """The feature a table embeds (``"t_item_id" → "item_id"``); a name without the prefix is returned as is."""
    return table[len(TABLE_PREFIX):] if table.startswith(TABLE_PREFIX) else table


# -- alignment by raw value ----------------------------------------------------------------------------------
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
    """:func:`align_tokens` for two feature maps in dict form (``FeatureMap.to_dict()``, as manifests store them).

    Args:
        target: the map whose ids index the result.
        source: the map whose ids the result holds.
        feature: feature of ``target``; ``source_feature`` (default: the same name) of ``source``.
    """
    return align_tokens(vocabulary_tokens(target, feature), vocabulary_tokens(source, source_feature or feature))


@dataclass
class Vocabulary:
    """Raw value → id for one feature.

    Args:
        name: feature name (``item_id``, ``category``, ...).
        tokens: raw values (as strings) in id order; ``tokens[i]`` has id ``i + NUM_RESERVED_IDS``.
        counts: training-data frequency of each token.
    """

    name: str
    tokens: list[str]
    counts: list[int]
    _index: pd.Index = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.counts):
            raise HybridInputError(f"vocabulary '{self.name}': {len(self.tokens)} tokens but {len(self.counts)} counts")
        self._index = pd.Index(self.tokens, dtype=object)
        if not self._index.is_unique:
            dup = self._index[self._index.duplicated()][0]
            raise HybridInputError(f"vocabulary '{self.name}': token {dup!r} appears twice")

    @classmethod
    def from_counts(cls, name: str, counts: pd.Series, min_count: int = 1) -> "Vocabulary":
        """Build from raw value → training frequency; values seen fewer than ``min_count`` times map to OOV."""
        counts = counts.groupby(counts.index.astype(str)).sum()
        counts = counts[counts >= min_count]
        # Stable order: frequency descending, then raw value — independent of row order.
        order = sorted(zip(counts.index, counts.to_numpy()), key=lambda kv: (-kv[1], kv[0]))
        return cls(name, [k for k, _ in order], [int(c) for _, c in order])

    @property
    def size(self) -> int:
        """Rows an embedding table for this feature needs (reserved ids included)."""
        return len(self.tokens) + NUM_RESERVED_IDS

    def encode(self, values: Iterable) -> np.ndarray:
        """Raw values → int64 ids; unseen values → ``OOV_ID``, missing (None/NaN) → ``PAD_ID``."""
        series = pd.Series(values, dtype=object) if not isinstance(values, pd.Series) else values
        missing = series.isna().to_numpy()
        ids = self._index.get_indexer(series.astype(str).to_numpy())
        ids = np.where(ids < 0, OOV_ID, ids + NUM_RESERVED_IDS).astype(np.int64)
        ids[missing] = PAD_ID
        return ids

    def decode(self, ids: Iterable[int]) -> list[str | None]:
        """Ids → raw values (``None`` for padding and OOV, which have no single raw value)."""
        return [self.tokens[i - NUM_RESERVED_IDS] if i >= NUM_RESERVED_IDS else None for i in ids]

    def id_counts(self) -> np.ndarray:
        """Training frequency indexed by id (reserved ids count 0); for logQ correction and popularity."""
        return np.concatenate([np.zeros(NUM_RESERVED_IDS, dtype=np.int64), np.asarray(self.counts, dtype=np.int64)])


class FeatureMap:
    """The vocabularies of a dataset, plus which sequence features share which vocabulary.

    Args:
        vocabularies: feature name → :class:`Vocabulary`.
        shared: derived feature → base feature whose vocabulary it uses
            (``hist_item_id`` → ``item_id``: a history of items uses the item ids).
        metadata: free-form facts about the fit (dataset, protocol, rows), saved with the map.
    """

    def __init__(self, vocabularies: Mapping[str, Vocabulary], shared: Mapping[str, str] | None = None,
                 metadata: Mapping | None = None) -> None:
        self.vocabularies = dict(vocabularies)
        self.shared = dict(shared or {})
        self.metadata = dict(metadata or {})
        for derived, base in self.shared.items():
            if base not in self.vocabularies:
                raise HybridInputError(f"feature map: '{derived}' shares the vocabulary of unknown feature '{base}'")

    # -- fitting -----------------------------------------------------------------------------------------
    @classmethod
    def fit(cls, columns: Mapping[str, pd.Series], min_count: int = 1, shared: Mapping[str, str] | None = None,
            metadata: Mapping | None = None) -> "FeatureMap":
        """Fit one vocabulary per column of raw values (list-valued columns count every element).

        Args:
            columns: feature name → raw values seen in the *training* data.
            min_count: values seen fewer times map to OOV.
            shared: see the class docstring.
        """
        vocabularies = {}
        for name, values in columns.items():
            values = pd.Series(values)
            if len(values) and isinstance(values.iloc[0], (list, tuple, np.ndarray)):
                values = values.explode()
            vocabularies[name] = Vocabulary.from_counts(name, values.dropna().astype(str).value_counts(), min_count)
        return cls(vocabularies, shared=shared, metadata=metadata)

    # -- lookup ------------------------------------------------------------------------------------------
    def __getitem__(self, feature: str) -> Vocabulary:
        base = self.shared.get(feature, feature)
        if base not in self.vocabularies:
            known = sorted(self.vocabularies) + sorted(self.shared)
            raise KeyError(f"feature map has no feature '{feature}' (known: {', '.join(known)})")
        return self.vocabularies[base]

    def __contains__(self, feature: str) -> bool:
        return feature in self.vocabularies or feature in self.shared

    def base_feature(self, feature: str) -> str:
        """The feature whose vocabulary ``feature`` uses (itself unless shared)."""
        return self.shared.get(feature, feature)

    def vocab_sizes(self) -> dict[str, int]:
        """Base feature → table rows (reserved ids included); what models size their tables with."""
        return {name: vocab.size for name, vocab in self.vocabularies.items()}

    # -- alignment ---------------------------------------------------------------------------------------
    def align(self, source: "FeatureMap", feature: str, source_feature: str | None = None) -> np.ndarray:
        """For each id of ``feature`` in this map, the id of the same raw value in ``source``.

        Returns an int64 array of length ``self[feature].size``; ``-1`` where the raw value is unknown to
        ``source`` (a new item: the caller initialises it by its own policy). Reserved ids map to
        themselves. This is how pretrained rows are moved into a model whose ids were assigned differently.

        Example:
            >>> a = FeatureMap.fit({"item_id": pd.Series(["x", "y", "y"])})
            >>> b = FeatureMap.fit({"item_id": pd.Series(["y", "z", "z", "x", "x", "x"])})
            >>> b.align(a, "item_id").tolist()   # b's ids 2..4 are x, z, y
            [0, 1, 3, -1, 2]
        """
        return align_tokens(self[feature].tokens, source[source_feature or feature]._index)

    # -- persistence -------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "reserved": {"padding": PAD_ID, "oov": OOV_ID},
            "vocabularies": {n: {"tokens": v.tokens, "counts": v.counts} for n, v in self.vocabularies.items()},
            "shared": self.shared,
            "metadata": self.metadata,
        }

    @classmethod
    def from_dict(cls, data: Mapping, source: str = "<dict>") -> "FeatureMap":
        try:
            if data.get("format_version") != FORMAT_VERSION:
                raise HybridInputError(f"{source}: feature map format_version {data.get('format_version')!r}, "
                                       f"expected {FORMAT_VERSION}")
            vocabs = {n: Vocabulary(n, list(v["tokens"]), list(v["counts"])) for n, v in data["vocabularies"].items()}
            return cls(vocabs, shared=data.get("shared", {}), metadata=data.get("metadata", {}))
        except (KeyError, TypeError, AttributeError) as err:
            raise HybridInputError(f"{source}: not a feature map ({type(err).__name__}: {err})") from None

    def save(self, path: str | os.PathLike) -> Path:
        """Write JSON atomically (a crash never leaves a half-written map)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), ensure_ascii=False))
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FeatureMap":
        path = Path(path)
        if not path.is_file():
            raise HybridInputError(f"{path}: feature map file not found")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise HybridInputError(f"{path}: not valid JSON (line {err.lineno}: {err.msg})") from None
        return cls.from_dict(data, source=str(path))

    def fingerprint(self) -> str:
        """A short hash of the vocabularies: two maps with the same ids for the same values agree."""
        payload = json.dumps({"v": {n: v.tokens for n, v in sorted(self.vocabularies.items())},
                              "s": dict(sorted(self.shared.items()))}, ensure_ascii=False)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, FeatureMap) and self.shared == other.shared
                and {n: (v.tokens, v.counts) for n, v in self.vocabularies.items()}
                == {n: (v.tokens, v.counts) for n, v in other.vocabularies.items()})

    def __repr__(self) -> str:
        sizes = ", ".join(f"{n}={s}" for n, s in self.vocab_sizes().items())
        return f"FeatureMap({sizes})"
