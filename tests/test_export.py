"""Serving export: every built-in ranker as plain tables + padded ids through ``torch.export``, against eager on
real ML-100K batches (protocol B); the JSON sidecar; refusals."""
from __future__ import annotations

import dataclasses
import itertools
import subprocess
import sys

import pytest
import torch

from hybrid.ctr_models import build_ranker, ranker_classes
from hybrid.ctr_models.export import (
    INPUT_NAMES,
    ServingRanker,
    export_ranker,
    load_exported,
    save_exported,
    serving_inputs,
)
from hybrid.ctr_models.multimodal import MultimodalConfig
from hybrid.data.batching import CTRBatchConverter, make_loader

TASKS = ("click", "rating5")
MAX_HISTORY = 12          # > max_len (8) of the tiny configs: the most recent 8 events are kept
ATOL = 1e-6
MULTIMODAL = {"simtier": True, "num_tiers": 10, "mnse": True,
              "mnse_inputs": ("max_similarity", "mean_similarity", "history_length", "time_gap"),
              "mnse_bases": (2, 3), "mnse_dim": 4, "similarity_levels": 64, "item_field": True,
              "mkmmd_weight": 0.1, "projection_hidden": (16,)}
# name -> (registry name, overrides of its tiny() config, with item vectors)
CASES = {
    "dcn_v2": ("dcn_v2", {}, False),
    "mmoe": ("mmoe", {}, False),
    "multi_embedding_moe": ("multi_embedding_moe", {}, False),
    "tin": ("tin", {}, False),
    "gpsd": ("gpsd", {}, False),
    "gpsd_hstu": ("gpsd", {"backbone": {"kind": "hstu", "num_layers": 1, "dim": 16, "num_heads": 2,
                                        "max_len": 16, "hstu_num_time_buckets": 16}}, False),
    "dcn_v2_multimodal": ("dcn_v2", {"cross_type": "mixture", "structure": "parallel",
                                     "multimodal": MULTIMODAL}, True),
    "multi_embedding_moe_multimodal": ("multi_embedding_moe", {"multimodal": MULTIMODAL}, True),
}


@pytest.fixture(scope="module")
def vocab_sizes(prepared_ratings):
    from hybrid.jobs.finetune import ctr_vocab_sizes

    return ctr_vocab_sizes(prepared_ratings.feature_map)


@pytest.fixture(scope="module")
def item_vectors(vocab_sizes):
    """Random vectors over the item vocabulary; PAD/OOV and a few items without a vector (zero rows)."""
    vectors = torch.randn(vocab_sizes["item_id"], 12, generator=torch.Generator().manual_seed(3))
    vectors[:2] = 0.0
    vectors[10:40] = 0.0
    return vectors


def _model(case: str, vocab_sizes, item_vectors) -> torch.nn.Module:
    name, overrides, multimodal = CASES[case]
    config_cls, _ = ranker_classes(name)
    config = config_cls.tiny()
    for key, value in overrides.items():
        if key == "multimodal":
            value = MultimodalConfig(**value)
        elif isinstance(value, dict):
            value = dataclasses.replace(getattr(config, key), **value)
        config = dataclasses.replace(config, **{key: value})
    torch.manual_seed(0)
    model = build_ranker(name, config, vocab_sizes, TASKS, item_vectors=item_vectors if multimodal else None)
    # away from init, so that a table or layer the serving path mislaid would show (GPSD's segment starts at 0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def _batches(prepared, model, batch_size: int, n: int, max_history: int = MAX_HISTORY, seed: int = 0):
    conv = CTRBatchConverter(prepared, "ctr_test", max_history=max_history, fields=list(model.spec.kjt_keys),
                             task_names=TASKS)
    # pool_batches=1: no length bucketing, so one batch mixes cut, full and short histories
    loader = make_loader(conv, batch_size=batch_size, shuffle=True, seed=seed, pool_batches=1)
    return list(itertools.islice(loader, n))


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0.0)


@pytest.mark.parametrize("case", list(CASES))
def test_exported_ranker_matches_eager_on_ml100k(case, prepared_ratings, vocab_sizes, item_vectors, tmp_path):
    model = _model(case, vocab_sizes, item_vectors)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    big, = _batches(prepared_ratings, model, 64, 1)
    small, = _batches(prepared_ratings, model, 23, 1, seed=1)
    one, = _batches(prepared_ratings, model, 1, 1, seed=2)
    empty, = _batches(prepared_ratings, model, 9, 1, max_history=0)       # every history empty
    lengths = big.sparse[model.spec.history_keys[0]].lengths()
    assert (lengths > model.spec.max_len).any() and (lengths < model.spec.max_len).any()   # both cut and padded
    assert int(empty.sparse[model.spec.history_keys[0]].lengths().sum()) == 0

    serving = ServingRanker(model)
    program, meta = save_exported(model, big, tmp_path / f"{case}.pt2")
    loaded, loaded_meta = load_exported(tmp_path / f"{case}.pt2")
    assert loaded_meta == meta and meta["task_names"] == list(TASKS) and meta["ranker_name"] == CASES[case][0]
    # plain aten ops only: nothing of TorchRec or fbgemm is needed to run it
    ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not [op for op in ops if "fbgemm" in op or "torchrec" in op], ops
    exported, reloaded = program.module(), loaded.module()
    with torch.no_grad():
        for batch in (big, small, one, empty):
            eager = model(batch)
            inputs = serving_inputs(model, batch)
            _close(serving(*inputs), eager)
            _close(exported(*inputs), eager)
            assert torch.equal(reloaded(*inputs), exported(*inputs))
    # the sidecar describes what was fed: names, order, dtypes and fixed dimensions
    assert [i["name"] for i in meta["inputs"]] == list(INPUT_NAMES)
    dims = {"batch": big.batch_size, "bag_len": serving_inputs(model, big).multi_ids.shape[-1]}
    for spec, tensor in zip(meta["inputs"], serving_inputs(model, big)):
        assert spec["dtype"] == str(tensor.dtype).removeprefix("torch.")
        assert [dims.get(d, d) for d in spec["shape"]] == list(tensor.shape), spec["name"]
    # the eager model is left as it was: same weights, same mode, usable for training
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert not model.training
    assert model.multimodal_features is None or not model.multimodal_features.traceable
    model.train()
    model(small).sum().backward()
    model.logging_metrics()


def test_program_runs_in_plain_pytorch(prepared_ratings, vocab_sizes, item_vectors, tmp_path):
    """A fresh interpreter that imports torch only (no hybrid, TorchRec or fbgemm) loads and runs the program."""
    model = _model("dcn_v2_multimodal", vocab_sizes, item_vectors)
    batch, = _batches(prepared_ratings, model, 17, 1)
    save_exported(model, batch, tmp_path / "ranker.pt2")
    torch.save(tuple(serving_inputs(model, batch)), tmp_path / "inputs.pt")
    script = (
        "import json, sys, torch\n"
        f"root = {str(tmp_path)!r}\n"
        "program = torch.export.load(root + '/ranker.pt2')\n"
        "names = [i['name'] for i in json.load(open(root + '/ranker.json'))['inputs']]\n"
        "inputs = torch.load(root + '/inputs.pt')\n"
        "assert len(names) == len(inputs) == 7\n"
        "torch.save(program.module()(*inputs), root + '/logits.pt')\n"
        "loaded = [m for m in sys.modules if m.split('.')[0] in ('hybrid', 'torchrec', 'fbgemm_gpu')]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
    with torch.no_grad():
        _close(torch.load(tmp_path / "logits.pt"), model(batch))


def test_serving_inputs_ignore_padding_and_keep_the_batch(prepared_ratings, vocab_sizes, item_vectors):
    """Whatever a caller puts beyond ``hist_lengths`` is padding; the program reads no state of its own."""
    model = _model("tin", vocab_sizes, item_vectors)
    batch, = _batches(prepared_ratings, model, 64, 1)
    serving = ServingRanker(model)
    inputs = serving_inputs(model, batch)
    T = model.spec.max_len
    pad = torch.arange(T).unsqueeze(0) >= inputs.hist_lengths.unsqueeze(1)             # [B, T]
    assert pad.any()
    junk = inputs._replace(hist_ids=torch.where(pad.unsqueeze(1), 7, inputs.hist_ids),
                           hist_timestamps=torch.where(pad, 123, inputs.hist_timestamps))
    with torch.no_grad():
        _close(serving(*junk), model(batch))
        # rows are independent: one row alone gives its own logits
        _close(serving(*(t[3:4] for t in inputs)), model(batch)[3:4])


def test_refusals(prepared_ratings, vocab_sizes, item_vectors, tmp_path):
    model = _model("dcn_v2", vocab_sizes, item_vectors)
    batch, = _batches(prepared_ratings, model, 8, 1)
    with pytest.raises(ValueError, match="expected a built-in Ranker"):
        ServingRanker(torch.nn.Linear(2, 2))
    meta_model = build_ranker("dcn_v2", ranker_classes("dcn_v2")[0].tiny(), vocab_sizes, TASKS,
                              embedding_device="meta")
    with pytest.raises(ValueError, match="is on the meta device"):
        ServingRanker(meta_model)
    without_genres, = _batches(prepared_ratings, _model("gpsd", vocab_sizes, item_vectors), 8, 1)
    with pytest.raises(ValueError, match=r"serving_inputs\(DCNv2\): CTRBatch.sparse is missing KJT keys"):
        serving_inputs(model, without_genres)
    no_ts = dataclasses.replace(batch, hist_timestamps=torch.zeros(0, dtype=torch.int64))
    with pytest.raises(ValueError, match="one timestamp per history event"):
        serving_inputs(model, no_ts)
    serving = ServingRanker(model)
    inputs = serving_inputs(model, batch)
    with pytest.raises(ValueError, match=r"hist_ids must be torch.int64 \[B, 3, 8\], got torch.int32"):
        serving(*inputs._replace(hist_ids=inputs.hist_ids.int()))
    with pytest.raises(ValueError, match=r"single_ids must be torch.int64 \[B, 7\]"):
        serving(*inputs._replace(single_ids=inputs.single_ids[:, :3]))
    with pytest.raises(ValueError, match="serving only"):
        serving.train()
    with pytest.raises(ValueError, match="as a .pt2 file"):
        save_exported(model, batch, tmp_path / "model.pt")
    with pytest.raises(ValueError, match="its sidecar"):
        load_exported(tmp_path / "missing.pt2")
    program = export_ranker(serving, batch)                                # a ServingRanker exports as is
    with pytest.raises(Exception, match=r"timestamps.size\(\)\[0\] == single_ids.size\(\)\[0\]"):  # one batch dim
        program.module()(*inputs._replace(timestamps=inputs.timestamps[:3]))
