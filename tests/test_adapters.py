"""Transfer adapters (``hybrid.adapters.apply_transfer``) on small models, tensor by tensor.

Every strategy loads exactly what GPSD's table says (checked row by row against the checkpoint, aligned by
raw id through two feature maps whose ids differ), new rows follow their policy, built-in rankers and
user-written models (TorchRec EBC, plain ``nn.Embedding``) receive the transfer, and every refusal names
the table or module and both shapes.
"""
from __future__ import annotations

import json

import pytest
import torch
from adapters_support import (
    one_thread,  # noqa: F401 (autouse fixture)
    raw_alignment,
    snapshot,
    source_and_target_maps,
    write_pretrain_checkpoint,
)
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig

from hybrid.adapters import (
    Strategy,
    TableTarget,
    TransferConfig,
    TransferError,
    TransferReport,
    apply_transfer,
    project,
)
from hybrid.core.backbones import BackboneConfig
from hybrid.core.training import OptimConfig, apply_sparse_optimizer
from hybrid.ctr_models import (
    DCNv2Config,
    FeatureConfig,
    GPSDRankerConfig,
    HistoryConfig,
    build_ranker,
)

TABLES = ("t_item_id", "t_category", "t_action")


@pytest.fixture(scope="module")
def maps():
    return source_and_target_maps()


@pytest.fixture(scope="module")
def pretrained(maps, tmp_path_factory):
    """(checkpoint dir, the GenerativeModel it holds) over the source map."""
    return write_pretrain_checkpoint(tmp_path_factory.mktemp("pretrain"), maps[0])


def gpsd(fm, seed=1, **backbone):
    torch.manual_seed(seed)
    config = GPSDRankerConfig(features=FeatureConfig(embedding_dim=16, max_len=8),
                              backbone=BackboneConfig(**{**BackboneConfig.tiny().to_dict(), **backbone}))
    return build_ranker("gpsd", config, fm.vocab_sizes(), ("click",))


def dcn(fm, encoder="target", dim=16, seed=1):
    torch.manual_seed(seed)
    history = HistoryConfig(encoder=encoder, attention_hidden=(8,),
                            backbone=BackboneConfig.tiny() if encoder == "transformer" else None)
    config = DCNv2Config(features=FeatureConfig(embedding_dim=dim, max_len=8), history=history, deep_hidden=(8,))
    return build_ranker("dcn_v2", config, fm.vocab_sizes(), ("click",))


def assert_rows(table: torch.Tensor, before: torch.Tensor, source: torch.Tensor, mapping: dict[int, int]) -> None:
    """Row by row: a target row with a raw-id match holds the pretrained row, every other row is untouched."""
    for t in range(table.shape[0]):
        expected = source[mapping[t]] if t in mapping else before[t]
        assert torch.equal(table[t], expected), f"row {t}"


@pytest.mark.parametrize("strategy", ["nt", "ft", "st", "ft_sf", "st_sf"])
def test_each_strategy_loads_exactly_the_intended_parameters(maps, pretrained, strategy):
    src_fm, tgt_fm = maps
    path, pre = pretrained
    model = gpsd(tgt_fm)
    before = snapshot(model)
    config = TransferConfig(strategy, None if strategy == "nt" else path.parent)  # the root: LATEST resolves
    report = apply_transfer(model, config, tgt_fm)
    s = Strategy.parse(strategy)
    after, source = model.state_dict(), pre.state_dict()

    touched = set()
    for table in TABLES:
        key = f"features.ec.embeddings.{table}.weight"
        touched.add(key)
        mapping = raw_alignment(tgt_fm, src_fm, table[2:]) if s.moves_tables else {}
        assert_rows(after[key], before[key], source[f"embeddings.embeddings.{table}.weight"], mapping)
        assert model.features.ec.embeddings[table].weight.requires_grad is (not s.freezes_tables)
        if s.moves_tables:
            entry = next(e for e in report.tables if e.target == f"features.ec:{table}")
            rows = after[key].shape[0]
            new = rows - 1 - len(mapping)  # every row but padding and the matched ones (OOV included)
            assert (entry.status, entry.rows_aligned, entry.rows_new) == ("loaded", len(mapping), new)
    assert len(raw_alignment(tgt_fm, src_fm, "item_id")) == 30  # the maps share 30 of 50 items
    for key in after:
        if key.startswith("backbone."):
            touched.add(key)
            expected = source[key] if s.moves_backbone else before[key]
            assert torch.equal(after[key], expected), key
    for key in set(after) - touched:  # segment embedding, heads: always the target's own init
        assert torch.equal(after[key], before[key]), key

    assert report.strategy is s
    assert sorted(report.frozen_tables) == (sorted(f"features.ec:{t}" for t in TABLES) if s.freezes_tables else [])
    assert report.loaded_modules == (["backbone"] if s.moves_backbone else [])
    frozen = sum(after[f"features.ec.embeddings.{t}.weight"].numel() for t in TABLES) if s.freezes_tables else 0
    assert report.frozen_params == frozen
    assert report.trainable_params + report.frozen_params == sum(p.numel() for p in model.parameters())
    assert report.pretrain_run_id == (None if s is Strategy.NT else "pretrain-run-0")


def test_new_row_policies_and_the_reserved_rows(maps, pretrained):
    src_fm, tgt_fm = maps
    path, pre = pretrained
    source = pre.embeddings.embeddings["t_item_id"].weight.detach()
    mapping = raw_alignment(tgt_fm, src_fm, "item_id")
    new_rows = [i for i in range(1, tgt_fm["item_id"].size) if i not in mapping]  # the OOV row (1) and new items
    for policy, expected in (("mean", source[2:].mean(0)), ("zero", torch.zeros(16))):
        model = gpsd(tgt_fm)
        pad = model.features.ec.embeddings["t_item_id"].weight[0].detach().clone()
        apply_transfer(model, TransferConfig("st", path, new_rows=policy, tables=("t_item_id",)), tgt_fm)
        table = model.features.ec.embeddings["t_item_id"].weight.detach()
        assert torch.equal(table[0], pad)  # padding keeps the target's row
        for i in new_rows:
            assert torch.allclose(table[i], expected, atol=1e-7), (policy, i)
        assert all(torch.equal(table[t], source[s]) for t, s in mapping.items())


def test_ft_moves_the_transformer_history_encoder_and_every_expert_gets_its_tables(maps, pretrained):
    src_fm, tgt_fm = maps
    path, pre = pretrained
    source = pre.state_dict()
    model = dcn(tgt_fm, encoder="transformer")
    before = snapshot(model)
    report = apply_transfer(model, TransferConfig("ft", path), tgt_fm)
    assert report.loaded_modules == ["input.history_encoder.backbone"]
    for key, value in model.state_dict().items():
        if key.startswith("input.history_encoder.backbone."):
            assert torch.equal(value, source[key.removeprefix("input.history_encoder.")]), key
        elif not key.startswith("input.features.ec.embeddings.t_"):
            assert torch.equal(value, before[key]), key
    own = {e.target for e in report.tables if e.status == "own init"}
    assert own == {"input.features.ec:t_user_id"}  # not pretrained: keeps its init, and is listed

    # target attention has no transformer: FT moves the tables and says why the backbone was not moved
    report = apply_transfer(dcn(tgt_fm), TransferConfig("ft", path), tgt_fm)
    assert report.skipped == [("backbone.*", "the model has no transformer backbone (only tables move)")]
    assert len(report.loaded_tables) == 3

    # the multi-embedding MoE: by default the pretrained item table fills the first embedding set only; the
    # other sets keep their own init (the K sets stay different) and the report says why
    def moe_model():
        torch.manual_seed(0)
        return build_ranker("multi_embedding_moe", {"features": {"embedding_dim": 16, "max_len": 8},
                                                    "history": {"encoder": "pooled"}, "num_experts": 2,
                                                    "expert_hidden": [8]}, tgt_fm.vocab_sizes(), ("click",))

    mapping = raw_alignment(tgt_fm, src_fm, "item_id")
    pretrained_rows = source["embeddings.embeddings.t_item_id.weight"]
    moe = moe_model()
    own_before = moe.experts[1].input.features.ec.embeddings["t_item_id"].weight.detach().clone()
    report = apply_transfer(moe, TransferConfig("st_sf", path, tables=["t_item_id"]), tgt_fm)
    assert report.frozen_tables == ["experts.0.input.features.ec:t_item_id"]
    first = moe.experts[0].input.features.ec.embeddings["t_item_id"].weight
    second = moe.experts[1].input.features.ec.embeddings["t_item_id"].weight
    assert not first.requires_grad and all(torch.equal(first[t], pretrained_rows[s]) for t, s in mapping.items())
    assert second.requires_grad and torch.equal(second, own_before)
    entry = next(e for e in report.tables if e.target == "experts.1.input.features.ec:t_item_id")
    assert entry.status == "own init" and "another embedding set of t_item_id" in entry.reason
    assert "embedding_sets='first'" in str(report)
    # embedding_sets="all": every set gets the same rows and, under SF, all are frozen
    moe = moe_model()
    report = apply_transfer(moe, TransferConfig("st_sf", path, tables=["t_item_id"], embedding_sets="all"), tgt_fm)
    assert report.frozen_tables == ["experts.0.input.features.ec:t_item_id", "experts.1.input.features.ec:t_item_id"]
    for k in range(2):
        table = moe.experts[k].input.features.ec.embeddings["t_item_id"].weight
        assert not table.requires_grad
        assert all(torch.equal(table[t], pretrained_rows[s]) for t, s in mapping.items())
    with pytest.raises(TransferError, match="TransferConfig.embedding_sets: unknown policy 'some'"):
        TransferConfig("st_sf", path, embedding_sets="some")
    assert ("t_category", "not in TransferConfig.tables") in report.skipped


class UserTorchRecModel(nn.Module):
    """A CTR model a user already has: an EmbeddingBagCollection with its own table names, and an MLP."""

    def __init__(self, n_items: int, n_users: int) -> None:
        super().__init__()
        self.sparse = EmbeddingBagCollection(tables=[
            EmbeddingBagConfig(name="item_table", num_embeddings=n_items, embedding_dim=16, feature_names=["item"]),
            EmbeddingBagConfig(name="user_table", num_embeddings=n_users, embedding_dim=16, feature_names=["user"]),
        ])
        self.over = nn.Sequential(nn.Linear(32, 8), nn.ReLU(), nn.Linear(8, 1))

    def forward(self, kjt):
        pooled = self.sparse(kjt)
        return self.over(torch.cat([pooled["item"], pooled["user"]], 1))


class UserEmbeddingModel(nn.Module):
    """A plain PyTorch CTR model: nn.Embedding tables (item with padding_idx) and a dot-product head."""

    def __init__(self, n_items: int, n_categories: int) -> None:
        super().__init__()
        self.item_emb = nn.Embedding(n_items, 16, padding_idx=0)
        self.genre = nn.Embedding(n_categories, 16)
        self.head = nn.Linear(16, 1)

    def forward(self, items, categories):
        return self.head(self.item_emb(items) * self.genre(categories))


def test_a_user_torchrec_model_receives_the_transfer(maps, pretrained):
    src_fm, tgt_fm = maps
    path, pre = pretrained
    source = pre.state_dict()["embeddings.embeddings.t_item_id.weight"]
    model = UserTorchRecModel(tgt_fm["item_id"].size, tgt_fm["user_id"].size)
    before = snapshot(model)
    report = apply_transfer(model, TransferConfig("st_sf", path, table_map={"t_item_id": "sparse:item_table"}), tgt_fm)
    after = model.state_dict()
    assert_rows(after["sparse.embedding_bags.item_table.weight"], before["sparse.embedding_bags.item_table.weight"],
                source, raw_alignment(tgt_fm, src_fm, "item_id"))
    for key in after:
        if key != "sparse.embedding_bags.item_table.weight":
            assert torch.equal(after[key], before[key]), key
    assert not model.sparse.embedding_bags["item_table"].weight.requires_grad
    assert model.sparse.embedding_bags["user_table"].weight.requires_grad
    assert report.frozen_tables == ["sparse:item_table"]
    assert sorted(report.skipped) == [("t_action", "not in table_map"), ("t_category", "not in table_map")]
    text = str(report)
    assert "sparse:item_table" in text and "frozen" in text and "trainable params:" in text


def test_a_user_nn_embedding_model_receives_the_transfer(maps, pretrained):
    src_fm, tgt_fm = maps
    path, pre = pretrained
    source = pre.state_dict()
    model = UserEmbeddingModel(tgt_fm["item_id"].size, tgt_fm["category"].size)
    before = snapshot(model)
    config = TransferConfig("st", path, table_map={"t_item_id": "item_emb",
                                                   "t_category": TableTarget("genre", feature="category")})
    report = apply_transfer(model, config, tgt_fm)
    assert_rows(model.item_emb.weight.detach(), before["item_emb.weight"],
                source["embeddings.embeddings.t_item_id.weight"], raw_alignment(tgt_fm, src_fm, "item_id"))
    assert_rows(model.genre.weight.detach(), before["genre.weight"],
                source["embeddings.embeddings.t_category.weight"], raw_alignment(tgt_fm, src_fm, "category"))
    assert torch.equal(model.item_emb.weight[0], torch.zeros(16))  # padding_idx row untouched
    assert torch.equal(model.head.weight, before["head.weight"])
    assert report.loaded_tables == ["item_emb", "genre"]

    # a model with its own id scheme: an explicit alignment (target row → pretrained row, -1 = new)
    own = nn.Embedding(4, 16)
    kept = own.weight[1].detach().clone()
    holder = nn.ModuleDict({"movies": own})
    apply_transfer(holder, TransferConfig("st", path, table_map={"t_item_id": "movies"}),
                   alignments={"t_item_id": [5, -1, 2, 9]})
    w = source["embeddings.embeddings.t_item_id.weight"]
    assert torch.equal(own.weight[0], w[5]) and torch.equal(own.weight[2], w[2]) and torch.equal(own.weight[3], w[9])
    assert torch.equal(own.weight[1], kept)


def test_projection_only_when_asked(maps, pretrained):
    src_fm, tgt_fm = maps
    path, pre = pretrained
    with pytest.raises(TransferError, match=r"table t_action: pretrained \[7, 16\] vs target "
                                            r"input\.features\.ec:t_action \[7, 8\]: embedding dims differ"):
        apply_transfer(dcn(tgt_fm, dim=8), TransferConfig("st", path), tgt_fm)
    report = apply_transfer(dcn(tgt_fm, dim=8), TransferConfig("st", path, projection="svd"), tgt_fm)
    assert {e.projection for e in report.tables if e.status == "loaded"} == {"svd"}

    # widening with svd rotates and zero-pads: the rows' dot products are kept
    table = pre.embeddings.embeddings["t_item_id"].weight.detach()
    wide = project(table, 24, "svd", known_from=2)
    assert wide.shape == (table.shape[0], 24)
    assert torch.allclose(wide @ wide.T, table @ table.T, atol=1e-5)
    assert torch.equal(project(table, 8, "random", seed=3), project(table, 8, "random", seed=3))


def test_clear_errors_name_tables_modules_and_shapes(maps, pretrained, tmp_path):
    src_fm, tgt_fm = maps
    path, _ = pretrained
    with pytest.raises(TransferError, match=r"unknown transfer strategy 'sft'; expected one of nt, ft, st, ft_sf, "
                                            r"st_sf"):
        TransferConfig("sft", path)
    assert TransferConfig("FT&SF", path).strategy is Strategy.FT_SF
    with pytest.raises(TransferError, match="strategy ST&SF needs a pretraining checkpoint"):
        TransferConfig("st_sf")
    with pytest.raises(TransferError, match=r"unknown key\(s\) stratgy \(did you mean strategy\?\)"):
        TransferConfig.from_dict({"stratgy": "st", "checkpoint": str(path)})
    with pytest.raises(TransferError, match="new_rows: unknown policy 'random'"):
        TransferConfig("st", path, new_rows="random")
    with pytest.raises(TransferError, match="not a pretraining checkpoint"):
        apply_transfer(gpsd(tgt_fm), TransferConfig("st", tmp_path), tgt_fm)

    with pytest.raises(TransferError, match=r"the checkpoint has no table\(s\) t_genres; it has t_action 7x16, "
                                            r"t_category 7x16, t_item_id 42x16"):
        apply_transfer(gpsd(tgt_fm), TransferConfig("st", path, table_map={"t_genres": "features.ec"}), tgt_fm)
    user = UserEmbeddingModel(tgt_fm["item_id"].size, tgt_fm["category"].size)
    with pytest.raises(TransferError, match=r"table_map\['t_item_id'\] = 'item_embb': no module or table of that "
                                            r"name; did you mean 'item_emb'"):
        apply_transfer(user, TransferConfig("st", path, table_map={"t_item_id": "item_embb"}), tgt_fm)
    with pytest.raises(TransferError, match=r"the collection at 'sparse' has no table 'items' \(it has: item_table, "
                                            r"user_table\)"):
        apply_transfer(UserTorchRecModel(52, 32), TransferConfig("st", path, table_map={"t_item_id": "sparse:items"}),
                       tgt_fm)
    # a model built from another feature map than the one passed
    with pytest.raises(TransferError, match=r"table features\.ec:t_item_id has 52 rows but the target feature map "
                                            r"gives 'item_id' 42 ids"):
        apply_transfer(gpsd(tgt_fm), TransferConfig("st", path, tables=["t_item_id"]), src_fm)
    with pytest.raises(TransferError, match="needs target_feature_map"):
        apply_transfer(gpsd(tgt_fm), TransferConfig("st", path))
    # FT into a backbone of another size names the tensors and shapes that differ
    with pytest.raises(TransferError, match=r"backbone 'backbone' does not match the pretrained backbone \(llama "
                                            r"L2H16A2\): .*not in the model: layers\.1\."):
        apply_transfer(gpsd(tgt_fm, num_layers=1), TransferConfig("ft", path), tgt_fm)
    with pytest.raises(TransferError, match=r"shapes differ: layers\.0\.feed_forward\.w1\.weight: checkpoint "
                                            r"\[64, 16\] vs model \[48, 16\]"):
        apply_transfer(gpsd(tgt_fm, ffn_multiple_of=16), TransferConfig("ft", path), tgt_fm)


def test_a_refused_transfer_leaves_the_model_untouched(maps, pretrained):
    _, tgt_fm = maps
    path, _ = pretrained
    model = gpsd(tgt_fm)
    apply_sparse_optimizer([model.features.ec], OptimConfig())  # optimizers attached too early
    before = snapshot(model)
    with pytest.raises(TransferError, match=r"ST&SF freezes features\.ec:t_action, but table features\.ec:t_action "
                                            r"already has an in-backward optimizer.*call apply_transfer before "
                                            r"apply_sparse_optimizer"):
        apply_transfer(model, TransferConfig("st_sf", path), tgt_fm)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


def test_tables_on_meta_are_materialised_then_loaded(maps, pretrained):
    src_fm, tgt_fm = maps
    path, pre = pretrained
    torch.manual_seed(1)
    model = build_ranker("gpsd", GPSDRankerConfig.tiny(), tgt_fm.vocab_sizes(), ("click",), embedding_device="meta")
    report = apply_transfer(model, TransferConfig("st_sf", path), tgt_fm)
    table = model.features.ec.embeddings["t_item_id"].weight
    assert not table.is_meta and not table.requires_grad and len(report.frozen_tables) == 3
    mapping = raw_alignment(tgt_fm, src_fm, "item_id")
    assert all(torch.equal(table[t], pre.embeddings.embeddings["t_item_id"].weight[s]) for t, s in mapping.items())
    bound = 0.05 * 3 ** 0.5  # new rows: the table's own uniform init
    new = [i for i in range(2, table.shape[0]) if i not in mapping]
    assert float(table[new].abs().max()) <= bound and float(table[new].abs().max()) > 0


def test_report_round_trips_and_logs_as_json(maps, pretrained, tmp_path):
    _, tgt_fm = maps
    path, _ = pretrained
    report = apply_transfer(gpsd(tgt_fm), TransferConfig("ft_sf", path, new_rows="mean"), tgt_fm)
    data = json.loads(json.dumps(report.to_dict()))
    again = TransferReport.from_dict(data)
    assert again == report and str(again) == str(report)
    assert TransferReport.load(report.save(tmp_path / "report.json")) == report
    assert TransferConfig.from_dict(report.config) == TransferConfig("ft_sf", path, new_rows="mean")
    metrics = report.metrics()
    assert metrics["transfer/tables_frozen"] == 3 and metrics["transfer/modules_loaded"] == 1
    assert metrics["transfer/rows_aligned/features.ec/t_item_id"] == 30
    assert metrics["transfer/rows_new/features.ec/t_item_id"] == 21  # 20 new items + the OOV row
    lines = str(report).splitlines()
    assert lines[0].startswith("Transfer FT&SF from ") and "(pretrain run pretrain-run-0)" in lines[0]
    assert len(report.notes) == 1  # category and action have no unseen values (only their OOV rows)
    assert lines[-2].startswith("trainable params: ") and "|| trainable%: " in lines[-2]
    assert lines[-1] == ("note: features.ec:t_item_id: 20 value(s) the pretraining never saw stay at their 'mean' "
                         "init while the table is frozen")


def test_ft_moves_the_input_projection_when_tables_are_narrower_than_the_backbone(maps, tmp_path):
    from hybrid.pretrain import GenerativeModelConfig

    src_fm, tgt_fm = maps
    narrow = GenerativeModelConfig(backbone=BackboneConfig.tiny(), embedding_dim=8,
                                   features=("item_id", "category", "action"))
    path, pre = write_pretrain_checkpoint(tmp_path, src_fm, narrow)
    torch.manual_seed(1)
    config = GPSDRankerConfig(features=FeatureConfig(embedding_dim=8, max_len=8), backbone=BackboneConfig.tiny())
    model = build_ranker("gpsd", config, tgt_fm.vocab_sizes(), ("click",))
    report = apply_transfer(model, TransferConfig("ft", path), tgt_fm)
    assert report.loaded_modules == ["backbone", "input_proj"]
    assert torch.equal(model.input_proj.weight, pre.input_proj.weight)
    # a target whose tables are as wide as its backbone has no projection to fill: the tables refuse first
    with pytest.raises(TransferError, match=r"pretrained \[\d+, 8\] vs target features\.ec:t_\w+ \[\d+, 16\]"):
        apply_transfer(gpsd(tgt_fm), TransferConfig("ft", path), tgt_fm)
