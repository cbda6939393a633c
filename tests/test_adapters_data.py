"""Raw-id alignment on real data: a checkpoint from a real (short) pretraining run on ML-100K protocol A
(last-item) moves into a DCN-v2 built from protocol B's (ratings) feature map, whose ids differ; and the
other way round, where protocol A knows items protocol B never saw."""
from __future__ import annotations

import torch
from adapters_support import (
    one_thread,  # noqa: F401 (autouse fixture)
    raw_alignment,
    snapshot,
    write_pretrain_checkpoint,
)

from hybrid.adapters import TransferConfig, apply_transfer
from hybrid.ctr_models import build_ranker
from hybrid.data.batching import CTRBatchConverter, SequenceBatchConverter, make_loader
from hybrid.jobs.finetune import ctr_vocab_sizes
from hybrid.pretrain import (
    GenerativeModelConfig,
    PretrainTrainConfig,
    build_model,
    train,
)

DCN = {"features": {"embedding_dim": 16, "max_len": 20}, "history": {"attention_hidden": [16]}, "deep_hidden": [16]}
FEATURES = ("item_id", "category", "action")


def _dcn(fm):
    torch.manual_seed(0)
    return build_ranker("dcn_v2", DCN, ctr_vocab_sizes(fm), ("click",))


def _check(model, report, target_fm, source_fm, source_state, before):
    for feature in FEATURES:
        key = f"input.features.ec.embeddings.t_{feature}.weight"
        table = model.state_dict()[key]
        mapping = raw_alignment(target_fm, source_fm, feature)
        src = source_state[f"embeddings.embeddings.t_{feature}.weight"]
        for t in range(table.shape[0]):
            assert torch.equal(table[t], src[mapping[t]] if t in mapping else before[key][t]), (feature, t)
        entry = next(e for e in report.tables if e.target == f"input.features.ec:t_{feature}")
        assert entry.rows_aligned == len(mapping) and entry.rows_new == table.shape[0] - 1 - len(mapping)
    return next(e for e in report.tables if e.target == "input.features.ec:t_item_id")


def test_pretrained_on_protocol_a_transfers_into_protocol_b_by_raw_id(prepared_last_item, prepared_ratings, tmp_path):
    fm_a, fm_b = prepared_last_item.feature_map, prepared_ratings.feature_map
    assert fm_a["item_id"].tokens[:50] != fm_b["item_id"].tokens[:50]  # the two protocols number items differently

    # a real pretraining run writes the checkpoint (trainer's own format: DCP state + manifest)
    cfg = PretrainTrainConfig(epochs=1, batch_size=64, max_steps=3, max_len=50, eval_every=0, checkpoint_every=0,
                              progress=False)
    pre = build_model(GenerativeModelConfig.tiny(), fm_a.vocab_sizes(), cfg.optim)
    loader = make_loader(SequenceBatchConverter(prepared_last_item, "pretrain_train", max_len=50, features=FEATURES),
                         64, shuffle=True, seed=0)
    result = train(pre, loader, None, cfg, checkpoint_dir=tmp_path / "ckpt",
                   manifest={"feature_map": fm_a.to_dict(), "mlflow_run_id": "run-a"})

    model = _dcn(fm_b)
    before = snapshot(model)
    report = apply_transfer(model, TransferConfig("st_sf", result.checkpoint), fm_b)
    item = _check(model, report, fm_b, fm_a, pre.state_dict(), before)
    assert (item.rows_aligned, item.rows_new) == (1573, 1)  # every protocol-B item is known to A; + the OOV row
    assert report.pretrain_run_id == "run-a" and len(report.frozen_tables) == 3

    # the transferred model runs on real protocol-B batches
    batch = next(iter(make_loader(CTRBatchConverter(prepared_ratings, "ctr_test", max_history=20,
                                                    fields=list(model.spec.kjt_keys)), 256, shuffle=False)))
    assert torch.isfinite(model(batch)).all()


def test_pretrained_on_protocol_b_leaves_new_rows_for_protocol_a_items(prepared_last_item, prepared_ratings, tmp_path):
    fm_a, fm_b = prepared_last_item.feature_map, prepared_ratings.feature_map
    path, pre = write_pretrain_checkpoint(tmp_path, fm_b)
    model = _dcn(fm_a)
    before = snapshot(model)
    report = apply_transfer(model, TransferConfig("st", path, new_rows="keep"), fm_a)
    item = _check(model, report, fm_a, fm_b, pre.state_dict(), before)
    assert (item.rows_aligned, item.rows_new) == (1573, 107)  # 106 items only protocol A has, + the OOV row
