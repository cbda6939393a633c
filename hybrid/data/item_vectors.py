"""Item vectors for the multimodal CTR features, aligned to a feature map: a ``[V, d]`` float tensor.

Two sources, both keyed by **raw** item id (the ids of the dataset files, not the encoded ones):

* a file: parquet with an item-id column and either one list/array column or several numeric columns (one
  per dimension), or ``.npy`` ``[n, d]`` with the raw ids in a second file (``.npy`` or text, one per line);
* item text (MovieLens title + genres) embedded by a packaged sentence-embedding model
  (:mod:`hybrid.data.text_encoder`; cached on disk).

Alignment: row ``i`` of the result is the vector of the item whose id is ``i`` in the feature map's
``item_id`` vocabulary (``fm["item_id"].tokens[i - 2]``); rows 0 (PAD) and 1 (OOV) and items the source has no
vector for follow the **missing policy**:

* ``"zero"`` (default): a zero row. The CTR modules (``hybrid.ctr_models.multimodal``) treat a zero row as "no
  vector": never counted by SimTier, no similarity for MNSE (a learned *missing* embedding instead), left out
  of MK-MMD. :attr:`ItemVectors.has_vector` is the same mask.
* ``"mean"``: OOV and missing known items get the mean of the known items' vectors (PAD stays zero); they then
  count as having a vector — useful when coverage is low and "unknown" should look like an average item.

Vectors from the source for items the feature map does not know (not in the training data) are dropped: the
ranker sees those items as OOV (id 1) anyway.

Example:
    >>> iv = load_item_vectors(ItemVectorsConfig(source="text"), prepared.feature_map, raw.items)  # doctest: +SKIP
    >>> iv.vectors.shape, iv.coverage                                                               # doctest: +SKIP
    (torch.Size([1619, 384]), 1.0)
    >>> model = build_ranker("tin", cfg, vocab_sizes, ("click",), item_vectors=iv.vectors)          # doctest: +SKIP
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch

from hybrid.core.errors import HybridInputError
from hybrid.core.feature_map import NUM_RESERVED_IDS, OOV_ID, FeatureMap
from hybrid.data.text_encoder import (
    DEFAULT_MODEL,
    DEFAULT_TEXT_FIELDS,
    TextEncoder,
    item_texts,
)

SOURCES = ("none", "file", "text")
MISSING_POLICIES = ("zero", "mean")


@dataclass
class ItemVectorsConfig:
    """Where the item vectors of the multimodal features come from (``item_vectors`` of a finetune config).

    Args:
        source: ``"none"``, ``"file"`` (``path``) or ``"text"`` (items' ``text_fields`` through ``model``).
        path: ``file``: a ``.parquet`` table or a ``.npy`` matrix.
        ids_path: ``file`` with ``.npy``: the raw item id of every row (``.npy`` array, or text: one per line).
        id_column: ``file`` with parquet: the raw item-id column.
        vector_columns: ``file`` with parquet: one list column, or one numeric column per dimension; empty =
            every column but ``id_column``.
        text_fields: ``text``: item-table columns joined into the text (``title``, ``genres``, ``year``).
        model: ``text``: a packaged model name or a sentence-transformers directory.
        batch_size: ``text``: texts per encoder batch.
        cache_dir: ``text``: vector cache (default ``$HYBRID_CACHE_DIR/text_vectors`` or
            ``~/.cache/hybrid/text_vectors``).
        missing: policy for items without a vector: ``"zero"`` or ``"mean"`` (module docstring).
    """

    source: Literal["none", "file", "text"] = "none"
    path: str | None = None
    ids_path: str | None = None
    id_column: str = "item_id"
    vector_columns: list[str] = field(default_factory=list)
    text_fields: list[str] = field(default_factory=lambda: list(DEFAULT_TEXT_FIELDS))
    model: str = DEFAULT_MODEL
    batch_size: int = 256
    cache_dir: str | None = None
    missing: Literal["zero", "mean"] = "zero"

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"item_vectors.source: unknown value {self.source!r}; expected one of {list(SOURCES)}")
        if self.missing not in MISSING_POLICIES:
            raise ValueError(f"item_vectors.missing: unknown value {self.missing!r}; expected one of "
                             f"{list(MISSING_POLICIES)}")
        if self.source == "file" and not self.path:
            raise ValueError("item_vectors.path: source 'file' needs the path of a .parquet or .npy file")
        if self.source == "text" and not self.text_fields:
            raise ValueError("item_vectors.text_fields: source 'text' needs at least one item column")


@dataclass
class ItemVectors:
    """Item vectors aligned to a feature map.

    Args:
        vectors: ``[V, d]`` float32; row = item id (``V`` = ``fm["item_id"].size``).
        has_vector: ``[V]`` bool: the row holds a real vector (after the ``mean`` policy, also filled rows).
        coverage: share of the vocabulary's known items (ids >= 2) the source had a vector for.
        source: a short description (``"text:all-MiniLM-L6-v2"``, ``"file:/path"``), for logs.
    """

    vectors: torch.Tensor
    has_vector: torch.Tensor
    coverage: float
    source: str = ""

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])


# -------------------------------------------------------------------------------------------- files


def read_vector_file(path: str | os.PathLike, id_column: str = "item_id", vector_columns: Sequence[str] = (),
                     ids_path: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read ``(raw ids [n] str, vectors [n, d] float32)`` from a parquet table or a ``.npy`` matrix.

    Raises:
        HybridInputError: a missing file or column, a ragged or non-numeric vector, NaN/inf, a duplicate id,
            or ids and rows that do not match — naming the file, and the row or column.
    """
    path = Path(path)
    if not path.is_file():
        raise HybridInputError(f"{path}: item vector file not found")
    if path.suffix == ".npy":
        vectors = np.load(path, allow_pickle=False)
        if vectors.ndim != 2:
            raise HybridInputError(f"{path}: expected a 2-D array [items, dim], got shape {list(vectors.shape)}")
        if ids_path is None:
            raise HybridInputError(f"{path}: a .npy vector file needs ids_path (the raw item id of every row)")
        ids = _read_ids(Path(ids_path))
        if len(ids) != vectors.shape[0]:
            raise HybridInputError(f"{ids_path}: {len(ids)} item ids for the {vectors.shape[0]} rows of {path}")
    elif path.suffix in (".parquet", ".pq"):
        table = pd.read_parquet(path)
        if id_column not in table:
            raise HybridInputError(f"{path}: no item-id column {id_column!r} (has: {', '.join(map(str, table.columns))})")
        columns = list(vector_columns) or [c for c in table.columns if c != id_column]
        absent = [c for c in columns if c not in table]
        if absent or not columns:
            raise HybridInputError(f"{path}: no vector column {absent[0] if absent else '(none left)'!r} "
                                   f"(has: {', '.join(map(str, table.columns))})")
        vectors = _stack_columns(table, columns, path)
        ids = table[id_column]
        if ids.isna().any():
            raise HybridInputError(f"{path}, row {int(np.flatnonzero(ids.isna().to_numpy())[0])}, column "
                                   f"{id_column!r}: empty item id")
        ids = _raw_ids(ids)
    else:
        raise HybridInputError(f"{path}: unsupported item vector file (expected .parquet or .npy)")
    vectors = np.asarray(vectors, dtype=np.float32)
    bad = ~np.isfinite(vectors).all(1)
    if bad.any():
        raise HybridInputError(f"{path}, row {int(np.flatnonzero(bad)[0])}: vector has NaN or inf")
    dup = pd.Index(ids).duplicated()
    if dup.any():
        raise HybridInputError(f"{path}: item id {ids[int(np.flatnonzero(dup)[0])]!r} appears twice")
    return ids, vectors


def _raw_ids(values: pd.Series) -> np.ndarray:
    """Ids as the feature map keys them (strings; integral floats lose their ``.0``)."""
    if pd.api.types.is_float_dtype(values.dtype) and (values % 1 == 0).all():
        values = values.astype(np.int64)
    return values.astype(str).to_numpy(dtype=object)


def _read_ids(path: Path) -> np.ndarray:
    if not path.is_file():
        raise HybridInputError(f"{path}: item id file not found")
    if path.suffix == ".npy":
        return _raw_ids(pd.Series(np.load(path, allow_pickle=False)))
    lines = [line.strip() for line in path.read_text().splitlines()]
    return np.asarray([line for line in lines if line], dtype=object)


def _stack_columns(table: pd.DataFrame, columns: list[str], path: Path) -> np.ndarray:
    if len(columns) == 1 and table[columns[0]].dtype == object:
        cells = table[columns[0]].to_numpy()
        dims = {len(np.atleast_1d(c)) if c is not None else 0 for c in cells}
        if len(dims) != 1 or 0 in dims:
            lengths = np.array([len(np.atleast_1d(c)) if c is not None else 0 for c in cells])
            row = int(np.flatnonzero(lengths != lengths[0])[0]) if (lengths != lengths[0]).any() else 0
            raise HybridInputError(f"{path}, row {row}, column {columns[0]!r}: vectors must all have the same "
                                   f"length (> 0); lengths seen: {sorted(dims)}")
        try:
            return np.stack([np.asarray(c, dtype=np.float32) for c in cells]) if len(cells) else np.zeros((0, 1))
        except (TypeError, ValueError):
            raise HybridInputError(f"{path}, column {columns[0]!r}: vector cells must be numbers") from None
    for c in columns:
        if not pd.api.types.is_numeric_dtype(table[c].dtype) or pd.api.types.is_bool_dtype(table[c].dtype):
            raise HybridInputError(f"{path}, column {c!r}: expected numbers (one column per dimension) or a "
                                   f"single list column, got dtype {table[c].dtype}")
    return table[columns].to_numpy(dtype=np.float32)


# -------------------------------------------------------------------------------------------- alignment


def align_item_vectors(ids: Sequence[str] | np.ndarray, vectors: np.ndarray, feature_map: FeatureMap,
                       missing: str = "zero", feature: str = "item_id", source: str = "") -> ItemVectors:
    """Put ``vectors`` (row ``k`` = raw item ``ids[k]``) at the rows of their ids in ``feature_map[feature]``.

    Example:
        >>> fm = FeatureMap.fit({"item_id": pd.Series(["b", "a", "b"])})      # ids: b=2, a=3
        >>> iv = align_item_vectors(["a", "zzz"], np.array([[1.0, 0.0], [0.0, 1.0]]), fm)
        >>> iv.vectors.tolist(), iv.coverage
        ([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [1.0, 0.0]], 0.5)
    """
    if missing not in MISSING_POLICIES:
        raise HybridInputError(f"item vectors: unknown missing policy {missing!r} (expected one of "
                               f"{list(MISSING_POLICIES)})")
    vocab = feature_map[feature]
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[0] != len(ids):
        raise HybridInputError(f"item vectors: expected [{len(ids)}, d] for {len(ids)} ids, got {list(vectors.shape)}")
    out = np.zeros((vocab.size, vectors.shape[1]), dtype=np.float32)
    found = np.zeros(vocab.size, dtype=bool)
    encoded = vocab.encode(pd.Series(list(ids), dtype=object))
    known = encoded >= NUM_RESERVED_IDS           # source items outside the vocabulary are dropped
    out[encoded[known]] = vectors[known]
    found[encoded[known]] = True
    # A zero vector counts as missing everywhere downstream; say so here too.
    found &= (out != 0).any(1)
    n_known = vocab.size - NUM_RESERVED_IDS
    coverage = float(found[NUM_RESERVED_IDS:].sum() / n_known) if n_known else 0.0
    if missing == "mean" and found.any():
        fill = ~found
        fill[0] = False                            # PAD stays zero: padding is masked anyway
        fill[OOV_ID] = True
        out[fill] = out[found].mean(0)
        found |= fill
    return ItemVectors(torch.from_numpy(out), torch.from_numpy(found), coverage, source)


# -------------------------------------------------------------------------------------------- text


def text_item_vectors(items: pd.DataFrame, feature_map: FeatureMap, fields: Sequence[str] = DEFAULT_TEXT_FIELDS,
                      encoder: TextEncoder | None = None, missing: str = "zero") -> ItemVectors:
    """Embed the text of every item the feature map knows (in id order) and align the vectors.

    Only the vocabulary's items are encoded (not the whole items table); items with no row in ``items`` or an
    empty text follow the ``missing`` policy.
    """
    encoder = encoder or TextEncoder()
    texts = item_texts(items, fields)
    tokens = pd.Index(feature_map["item_id"].tokens, dtype=object)
    text = texts[~texts.index.duplicated()].reindex(tokens)
    have = text.notna().to_numpy()
    vectors = encoder.encode(text[have].tolist()) if have.any() else np.zeros((0, 1), np.float32)
    if not have.any():
        raise HybridInputError("item vectors: no item of the feature map has a text in the items table "
                               f"(fields {list(fields)})")
    return align_item_vectors(tokens[have].to_numpy(), vectors, feature_map, missing=missing,
                              source=f"text:{encoder.model}")


def load_item_vectors(cfg: ItemVectorsConfig, feature_map: FeatureMap, items: pd.DataFrame | None = None) -> ItemVectors | None:
    """The item vectors ``cfg`` describes, aligned to ``feature_map``; ``None`` for ``source: none``.

    Args:
        cfg: the source.
        feature_map: the vocabulary the ranker's ids come from.
        items: the dataset's items table (``source: text`` only).
    """
    if cfg.source == "none":
        return None
    if cfg.source == "file":
        ids, vectors = read_vector_file(cfg.path, cfg.id_column, cfg.vector_columns, cfg.ids_path)  # type: ignore[arg-type]
        return align_item_vectors(ids, vectors, feature_map, missing=cfg.missing, source=f"file:{cfg.path}")
    if items is None:
        raise HybridInputError("item_vectors.source 'text': the dataset has no items table to take the text from")
    encoder = TextEncoder(cfg.model, batch_size=cfg.batch_size, cache_dir=cfg.cache_dir)
    return text_item_vectors(items, feature_map, cfg.text_fields, encoder, missing=cfg.missing)
