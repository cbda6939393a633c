"""``apply_transfer``: pretrained tables (and, for FT, the transformer) into a CTR model, in one call.

Order of a run (why it matters: a frozen table must never get an in-backward optimizer)::

    model = build_ranker(...)                       # or your own model; unsharded (CPU or meta tables)
    report = apply_transfer(model, TransferConfig("st_sf", ckpt), target_feature_map)
    model = prepare_for_training(model, optim)      # in-backward optimizers for trainable tables only,
                                                    # then DMP sharding (frozen tables: lr-0 fused kernel)
    print(report)

``apply_transfer`` also accepts an already sharded ``DistributedModelParallel`` model (values go into each
rank's shards); it can freeze a table there only if the table was frozen before sharding.

Everything is checked before anything is written: a transfer that fails leaves the model untouched.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from hybrid.adapters import guard
from hybrid.adapters.config import Strategy, TransferConfig, TransferError
from hybrid.adapters.report import (
    LOADED,
    OWN_INIT,
    SKIPPED,
    ModuleEntry,
    TableEntry,
    TransferReport,
)
from hybrid.adapters.source import PretrainedCheckpoint
from hybrid.adapters.targets import (
    TableSlot,
    all_table_slots,
    backbone_modules,
    input_projection_path,
    resolve_target,
    sharded_learning_rate,
)
from hybrid.core.feature_map import (
    NUM_RESERVED_IDS,
    OOV_ID,
    PAD_ID,
    TABLE_PREFIX,
    align_feature_maps,
    table_feature,
)
from hybrid.core.tables import is_table_key
from hybrid.core.training import gather_from_ranks, is_dmp, unwrap_dmp
from hybrid.pretrain.layout import BACKBONE_PREFIX, INPUT_PROJ_KEY, table_key

KEEP_ROW = -2  # alignment value: leave the target row as it is (the padding row)
NEW_ROW = -1   # alignment value: a row the pretrained map does not know (initialised by ``new_rows``)


@dataclass
class _TablePlan:
    source: str
    slot: TableSlot
    feature: str
    alignment: np.ndarray | None = None  # [R_target]: source row, NEW_ROW or KEEP_ROW
    reserved_ids: bool = True            # aligned through feature maps (ids 0/1 reserved)
    overlap: float | None = None         # share of the target's known raw values the pretrained map knows


@dataclass
class _ModulePlan:
    source: str            # "backbone.*" or "input_proj"
    target: str
    keys: dict[str, str]   # target state-dict key (relative to the module) → DCP key


def apply_transfer(
    model: nn.Module,
    config: TransferConfig,
    target_feature_map: Any = None,
    *,
    source_feature_map: Any = None,
    alignments: Mapping[str, Any] | None = None,
) -> TransferReport:
    """Load pretrained tables (rows aligned by raw id) and, for FT, the backbone; freeze for SF.

    Call it on the unsharded model *before* optimizers are attached and before sharding (SF needs that:
    a frozen table must get no in-backward optimizer), or on a ``DistributedModelParallel`` model to load
    values into its shards.

    Args:
        model: the target: a built-in ranker or any ``nn.Module`` with TorchRec collections or
            ``nn.Embedding`` tables; unsharded (tables on CPU or ``meta``: meta tables are materialised
            with their own init first) or DMP-sharded.
        config: :class:`~hybrid.adapters.config.TransferConfig`.
        target_feature_map: the feature map the target's ids come from: a ``FeatureMap`` (anything with
            ``to_dict()``) or its dict form. Rows move by raw value: target id ``i`` gets the pretrained row
            of the same raw item/category. Not needed for NT, nor for tables given in ``alignments``.
        source_feature_map: overrides the feature map stored in the checkpoint's manifest.
        alignments: pretrained table → int array ``[target rows]`` giving, for every target row, the
            pretrained row to copy or ``-1`` (new row, ``new_rows`` policy) — for models whose ids do not
            come from a feature map. No reserved ids are assumed for these.

    Returns:
        :class:`~hybrid.adapters.report.TransferReport` (``print(report)`` for the table).

    Raises:
        TransferError: unknown table or path, dims or vocabulary sizes that differ (the message names the
            table and both shapes), a table that cannot be frozen where it is, a missing feature map.

    Example:
        >>> model = build_ranker("dcn_v2", None, fm.vocab_sizes(), ("click",))              # doctest: +SKIP
        >>> report = apply_transfer(model, TransferConfig("st_sf", "runs/pre/checkpoints"), fm)  # doctest: +SKIP
        >>> report.frozen_tables                                                              # doctest: +SKIP
        ['input.features.ec:t_item_id', 'input.features.ec:t_category', 'input.features.ec:t_action']
    """
    if not isinstance(config, TransferConfig):
        raise TransferError(f"apply_transfer: config must be a TransferConfig, got {type(config).__name__}")
    inner = unwrap_dmp(model)   # the user's module (``dmp.module`` under DMP)
    strategy = config.strategy
    report = TransferReport(strategy=strategy, sharded=is_dmp(model), config=config.to_dict())
    if strategy is Strategy.NT:
        _own_init_entries(model, inner, report, set(), "NT: no transfer")
        for path in backbone_modules(inner):
            report.modules.append(ModuleEntry(OWN_INIT, "backbone.*", path, params=_numel(inner.get_submodule(path)),
                                              reason="NT: no transfer"))
        _count(model, inner, report)
        return report

    source = PretrainedCheckpoint.open(config.checkpoint)  # type: ignore[arg-type]
    report.checkpoint, report.pretrain_run_id = str(source.path), source.run_id

    # 1. Plan and check everything before writing anything; under DMP every rank must reach the same verdict
    #    before the collective read (a rank holding no shard of a table can see no problem with it).
    own_init: dict[str, str] = {}
    try:
        plans, module_plans = _plan(model, inner, config, source, report, own_init, target_feature_map,
                                    source_feature_map, alignments)
    except TransferError as err:
        _agree_across_ranks(model, err)
        raise
    _agree_across_ranks(model, None)

    # 2. Read what is needed in one (collective) DCP call, then write.
    keys = {table_key(p.source) for p in plans} | {k for m in module_plans for k in m.keys.values()}
    tensors = source.load(keys)
    projected: dict[tuple[str, int], torch.Tensor] = {}
    for plan in plans:
        entry = _write_table(plan, tensors[table_key(plan.source)], source, config, projected)
        if strategy.freezes_tables:
            plan.slot.freeze()
            entry.frozen = True
            unseen = entry.rows_new - (1 if plan.reserved_ids else 0)  # not counting the OOV row
            if unseen > 0:
                report.notes.append(f"{plan.slot.name}: {unseen} value(s) the pretraining never saw stay at their "
                                    f"'{config.new_rows}' init while the table is frozen")
        report.tables.append(entry)
    for mplan in module_plans:
        module = _submodule(inner, mplan.target)
        if any(p.is_meta for p in module.parameters()):
            module.to_empty(device="cpu")
        module.load_state_dict({k: tensors[v] for k, v in mplan.keys.items()}, strict=True)
        report.modules.append(ModuleEntry(LOADED, mplan.source, mplan.target, tensors=len(mplan.keys),
                                          params=_numel(module)))
    _own_init_entries(model, inner, report, {p.slot.key for p in plans}, "not in the transfer", own_init)
    _count(model, inner, report)
    guard.arm(inner, [p.slot for p in plans], {p.slot.key for p in plans if strategy.freezes_tables})
    return report


def _agree_across_ranks(model: nn.Module, error: TransferError | None) -> None:
    """Under a multi-rank DMP model: raise on every rank when any rank's planning failed (naming that rank), so
    no rank enters the collective checkpoint read alone and hangs. A no-op for one process."""
    if not is_dmp(model):
        return
    verdicts = gather_from_ranks(None if error is None else str(error))
    failed = [(rank, message) for rank, message in enumerate(verdicts) if message is not None]
    if failed and error is None:
        rank, message = failed[0]
        others = f" (and {len(failed) - 1} other rank(s))" if len(failed) > 1 else ""
        raise TransferError(f"rank {rank}{others}: {message}")


def _plan(model: nn.Module, inner: nn.Module, config: TransferConfig, source: PretrainedCheckpoint,
          report: TransferReport, own_init: dict[str, str], target_feature_map: Any, source_feature_map: Any,
          alignments: Mapping[str, Any] | None) -> tuple[list[_TablePlan], list]:
    """Every table and module plan of the transfer, checked (dims, alignment, freezability); writes nothing."""
    strategy = config.strategy
    plans = _plan_tables(inner, config, source, report, own_init)
    src_fm = _as_dict(source_feature_map) if source_feature_map is not None else source.feature_map
    tgt_fm = _as_dict(target_feature_map) if target_feature_map is not None else None
    seen: dict[str, str] = {}
    for plan in plans:
        if plan.slot.key in seen:
            raise TransferError(f"table {plan.slot.name} would be filled twice (from {seen[plan.slot.key]} and "
                                f"{plan.source}); map each target table once")
        seen[plan.slot.key] = plan.source
        _check_dims(plan, source, config)
        _align(plan, source, src_fm, tgt_fm, alignments)
        _check_overlap(plan, config, src_fm, tgt_fm)
        if strategy.freezes_tables:
            problem = plan.slot.freeze_problem(model)
            if problem:
                raise TransferError(f"{strategy.label} freezes {plan.slot.name}, but {problem}")
    note = _dataset_note(source, src_fm, tgt_fm) if any(p.overlap is not None for p in plans) else None
    if note:
        report.notes.append(note)
    module_plans = _plan_modules(inner, config, source, report) if strategy.moves_backbone else []
    if not strategy.moves_backbone:
        paths = config.backbone_paths if config.backbone_paths is not None else backbone_modules(inner)
        for path in paths:
            report.modules.append(ModuleEntry(OWN_INIT, "backbone.*", path, params=_numel(_submodule(inner, path)),
                                              reason=f"{strategy.label} moves no backbone"))
    return plans, module_plans


# ---------------------------------------------------------------------------------------------- planning

def _plan_tables(inner: nn.Module, config: TransferConfig, source: PretrainedCheckpoint,
                 report: TransferReport, own_init: dict[str, str]) -> list[_TablePlan]:
    """The (pretrained table → target slot) writes; target slots deliberately left alone go into ``own_init``
    (slot key → reason)."""
    available = source.tables
    table_map = config.table_map
    for what, names in (("TransferConfig.tables", config.tables or ()), ("TransferConfig.table_map", table_map or ())):
        unknown = [n for n in names if n not in available]
        if unknown:
            raise TransferError(f"{what}: the checkpoint has no table(s) {', '.join(unknown)}; it has "
                                + ", ".join(f"{t} {r}x{d}" for t, (r, d) in available.items()))
    wanted = list(config.tables) if config.tables is not None else (list(table_map) if table_map else list(available))
    plans = []
    for src in available:
        if src not in wanted:
            report.tables.append(TableEntry(SKIPPED, src, source_shape=list(available[src]),
                                            reason="not in TransferConfig.tables" if config.tables is not None
                                            else "not in table_map"))
    for src in wanted:
        shape = list(available[src])
        if table_map is not None and src not in table_map:
            report.tables.append(TableEntry(SKIPPED, src, source_shape=shape, reason="not in table_map"))
            continue
        if table_map is not None:
            targets = [(slot, t.feature) for t in table_map[src] for slot in resolve_target(inner, t.path, src)]
        else:
            targets = [(slot, None) for slot in all_table_slots(inner) if slot.table == src]
            if len(targets) > 1 and config.embedding_sets == "first":
                # several embedding sets (multi-embedding MoE): fill one, the others keep their own init so
                # the sets stay different (TransferConfig.embedding_sets)
                for slot, _ in targets[1:]:
                    own_init[slot.key] = (f"another embedding set of {src}: keeps its own init, so the sets stay "
                                          "different (embedding_sets='first'; 'all' fills every set alike)")
                targets = targets[:1]
            if not targets:
                has_plain = any(isinstance(m, (nn.Embedding, nn.EmbeddingBag)) for m in inner.modules())
                reason = f"no table named '{src}' in the model" + (" (map nn.Embedding tables with table_map)"
                                                                  if has_plain else "")
                report.tables.append(TableEntry(SKIPPED, src, source_shape=shape, reason=reason))
                continue
        for slot, feature in targets:
            if feature is None:
                name = slot.table_name
                feature = table_feature(name) if name.startswith(TABLE_PREFIX) else table_feature(src)
            plans.append(_TablePlan(src, slot, feature))
    return plans


def _check_dims(plan: _TablePlan, source: PretrainedCheckpoint, config: TransferConfig) -> None:
    rows, dim = source.tables[plan.source]
    t_rows, t_dim = plan.slot.shape
    if dim != t_dim and config.projection is None:
        raise TransferError(f"table {plan.source}: pretrained [{rows}, {dim}] vs target {plan.slot.name} "
                            f"[{t_rows}, {t_dim}]: embedding dims differ ({dim} vs {t_dim}); build the target with "
                            f"embedding_dim={dim}, or set projection='svd' or 'random'")


def _align(plan: _TablePlan, source: PretrainedCheckpoint, src_fm: Mapping | None, tgt_fm: Mapping | None,
           alignments: Mapping[str, Any] | None) -> None:
    """Fill ``plan.alignment``: for every target row, the pretrained row, NEW_ROW or KEEP_ROW."""
    rows, _ = source.tables[plan.source]
    t_rows, _ = plan.slot.shape
    given = None
    if alignments is not None:
        given = alignments.get(plan.slot.name, alignments.get(plan.source))
    if given is not None:
        a = np.asarray(given, dtype=np.int64).reshape(-1)
        if a.shape[0] != t_rows:
            raise TransferError(f"alignments[{plan.source!r}]: {a.shape[0]} entries but the target table "
                                f"{plan.slot.name} has {t_rows} rows")
        if a.size and (a.max() >= rows or a.min() < NEW_ROW):
            raise TransferError(f"alignments[{plan.source!r}]: values must be -1 or pretrained rows 0..{rows - 1}, "
                                f"got range [{a.min()}, {a.max()}]")
        plan.alignment, plan.reserved_ids = a, False
        return
    src_feature = table_feature(plan.source)
    if tgt_fm is None:
        raise TransferError(f"table {plan.source} → {plan.slot.name}: rows move by raw id, so apply_transfer needs "
                            f"target_feature_map (a FeatureMap or its dict), or alignments={{'{plan.source}': ids}}")
    if src_fm is None:
        raise TransferError(f"{source.path}: the manifest has no feature map, so the pretrained ids of {plan.source} "
                            "cannot be matched to raw values; pass source_feature_map or alignments")
    try:
        a = align_feature_maps(tgt_fm, src_fm, plan.feature, src_feature)
    except KeyError as err:
        which = "target" if plan.feature not in _features(tgt_fm) else "pretraining"
        raise TransferError(f"table {plan.source} → {plan.slot.name}: the {which} feature map: {err.args[0]}; "
                            "name the target feature with TableTarget(path, feature=...)") from None
    src_size = len(src_fm["vocabularies"][src_fm.get("shared", {}).get(src_feature, src_feature)]["tokens"]) \
        + NUM_RESERVED_IDS
    if src_size != rows:
        raise TransferError(f"table {plan.source}: pretrained [{rows}, ...] but the checkpoint's feature map gives "
                            f"'{src_feature}' {src_size} ids; the manifest does not describe this table")
    if a.shape[0] != t_rows:
        raise TransferError(f"table {plan.slot.name} has {t_rows} rows but the target feature map gives "
                            f"'{plan.feature}' {a.shape[0]} ids (reserved included); the model was built from "
                            "another feature map")
    a = a.copy()
    a[PAD_ID] = KEEP_ROW   # padding carries no meaning to transfer (models mask it); keep the target's row
    a[OOV_ID] = NEW_ROW    # OOV = "an item this model does not know": initialised like the new items
    plan.alignment = a


def _check_overlap(plan: _TablePlan, config: TransferConfig, src_fm: Mapping | None, tgt_fm: Mapping | None) -> None:
    """Set ``plan.overlap`` (a table aligned through feature maps) and refuse one below ``config.min_overlap``:
    a checkpoint pretrained on another dataset shares raw ids with the target by accident only, and would fill
    rows from unrelated items. Feature maps hold vocabularies, no per-item attributes, so the raw-id overlap
    is all that can be compared."""
    if not plan.reserved_ids or plan.alignment is None:
        return   # rows given by ``alignments``: the caller chose them
    known = plan.alignment[NUM_RESERVED_IDS:]
    if known.size == 0:
        return   # an empty vocabulary: nothing to compare
    found = int((known >= 0).sum())
    plan.overlap = found / known.size
    if plan.overlap >= config.min_overlap:
        return
    what = "items" if plan.feature == "item_id" else f"'{plan.feature}' values"
    datasets = _datasets(src_fm, tgt_fm)
    origin = (f"the checkpoint was pretrained on '{datasets[0]}', the target's data is '{datasets[1]}'"
              if datasets else "the checkpoint was probably pretrained on another dataset")
    raise TransferError(f"table {plan.source} → {plan.slot.name}: only {_percent(plan.overlap)} of the target's "
                        f"{known.size:,} {what} are known to the checkpoint ({found:,}; min_overlap "
                        f"{_percent(config.min_overlap)}): {origin}, and rows of other values that share a raw id "
                        "would be transferred; pass --allow-foreign-ids (TransferConfig(min_overlap=0.0)) to "
                        "transfer anyway, or pretrain on the target's data")


def _percent(share: float) -> str:
    return f"{100 * share:.1f} %" if 0 < share < 0.01 else f"{100 * share:.0f} %"


def _datasets(src_fm: Mapping | None, tgt_fm: Mapping | None) -> tuple[str, str] | None:
    """(pretraining dataset, target dataset) as the two feature maps' metadata name them, when they differ."""
    names = [str((fm or {}).get("metadata", {}).get("dataset") or "") for fm in (src_fm, tgt_fm)]
    return (names[0], names[1]) if all(names) and names[0] != names[1] else None


def _dataset_note(source: PretrainedCheckpoint, src_fm: Mapping | None, tgt_fm: Mapping | None) -> str | None:
    datasets = _datasets(src_fm, tgt_fm)
    if datasets is None:
        return None
    digest = source.manifest.get("data_hash")
    where = f" (prepared data {str(digest)[:12]})" if digest else ""
    return (f"the checkpoint was pretrained on '{datasets[0]}'{where}, the target's feature map was fitted on "
            f"'{datasets[1]}': rows are aligned by raw id, which means the same thing in both only if the two "
            "datasets share their id space")


def _plan_modules(inner: nn.Module, config: TransferConfig, source: PretrainedCheckpoint,
                  report: TransferReport) -> list[_ModulePlan]:
    src_shapes = source.backbone_shapes
    if not src_shapes:
        raise TransferError(f"{source.path}: the checkpoint holds no backbone ('{BACKBONE_PREFIX}*'), which "
                            f"{config.strategy.label} moves")
    explicit = config.backbone_paths is not None
    paths = list(config.backbone_paths) if explicit else backbone_modules(inner)
    if not paths:
        report.modules.append(ModuleEntry(SKIPPED, "backbone.*", tensors=len(src_shapes),
                                          reason="the model has no transformer backbone (only tables move)"))
        return []
    plans = []
    for path in paths:
        module = _submodule(inner, path)
        target = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        _check_module(f"backbone '{path}'", src_shapes, target, source)
        plans.append(_ModulePlan("backbone.*", path, {k: BACKBONE_PREFIX + k for k in target}))
        proj = input_projection_path(inner, path)
        src_proj = source.input_proj_shape
        if proj is not None and src_proj is not None:
            shape = tuple(_submodule(inner, proj).weight.shape)
            if shape != tuple(src_proj):
                raise TransferError(f"input_proj → '{proj}': checkpoint {list(src_proj)} vs model {list(shape)}; "
                                    "the table width or the backbone width differs from pretraining")
            plans.append(_ModulePlan("input_proj", proj, {"weight": INPUT_PROJ_KEY}))
        elif proj is not None:
            report.modules.append(ModuleEntry(OWN_INIT, "input_proj", proj, params=_numel(_submodule(inner, proj)),
                                              reason="pretraining had no input_proj (tables as wide as the backbone)"))
        elif src_proj is not None:
            report.modules.append(ModuleEntry(SKIPPED, "input_proj", tensors=1,
                                              reason=f"no input_proj beside '{path}' in the model"))
    return plans


def _check_module(what: str, source: Mapping[str, tuple], target: Mapping[str, tuple],
                  checkpoint: PretrainedCheckpoint) -> None:
    missing = sorted(set(target) - set(source))
    unexpected = sorted(set(source) - set(target))
    differ = [f"{k}: checkpoint {list(source[k])} vs model {list(target[k])}"
              for k in sorted(set(source) & set(target)) if tuple(source[k]) != tuple(target[k])]
    if missing or unexpected or differ:
        cfg = checkpoint.backbone_config or {}
        size = f"L{cfg.get('num_layers', '?')}H{cfg.get('dim', '?')}A{cfg.get('num_heads', '?')}"
        pretrained = f"{cfg.get('kind', '?')} {size}"
        parts = []
        if differ:
            parts.append("shapes differ: " + "; ".join(differ[:6]) + (" ..." if len(differ) > 6 else ""))
        if missing:
            parts.append("not in the checkpoint: " + ", ".join(missing[:6]) + (" ..." if len(missing) > 6 else ""))
        if unexpected:
            parts.append("not in the model: " + ", ".join(unexpected[:6]) + (" ..." if len(unexpected) > 6 else ""))
        raise TransferError(f"{what} does not match the pretrained backbone ({pretrained}): " + " | ".join(parts))


# ---------------------------------------------------------------------------------------------- writing

def _write_table(plan: _TablePlan, src: torch.Tensor, source: PretrainedCheckpoint, config: TransferConfig,
                 projected: dict[tuple[str, int], torch.Tensor]) -> TableEntry:
    t_rows, t_dim = plan.slot.shape
    known_from = NUM_RESERVED_IDS if plan.reserved_ids else 0  # pretrained rows that hold real values
    if src.shape[1] != t_dim:
        cache = (plan.source, t_dim)
        if cache not in projected:
            projected[cache] = project(src, t_dim, config.projection or "svd", config.seed, known_from)
        src = projected[cache]
    a = torch.from_numpy(plan.alignment)  # type: ignore[arg-type]
    aligned = a >= 0
    new = a == NEW_ROW
    full = torch.zeros(t_rows, t_dim, dtype=src.dtype)
    full[aligned] = src[a[aligned]]
    write = aligned.clone()
    if config.new_rows == "mean":
        full[new] = src[known_from:].mean(0)
        write |= new
    elif config.new_rows == "zero":
        write |= new  # rows of ``full`` are already zero
    plan.slot.materialize()
    plan.slot.write(full, write)
    src_shape = list(source.tables[plan.source])
    return TableEntry(LOADED, plan.source, plan.slot.name, src_shape, [t_rows, t_dim], feature=plan.feature,
                      rows_aligned=int(aligned.sum()), rows_new=int(new.sum()), new_rows=config.new_rows,
                      projection=config.projection if src_shape[1] != t_dim else None, overlap=plan.overlap)


def project(table: torch.Tensor, dim: int, method: str, seed: int = 0, known_from: int = 0) -> torch.Tensor:
    """Map ``table [R, D]`` to ``[R, dim]``.

    ``svd``: ``table @ V_k`` with ``V_k`` the top-``k`` right-singular vectors of the real rows
    (``table[known_from:]``), i.e. the best rank-``k`` preservation of the rows' dot products; zero columns
    pad it when ``dim > D`` (then dot products are preserved exactly). ``random``: ``table @ G`` with
    ``G ~ N(0, 1/dim)`` ``[D, dim]`` drawn from ``seed`` — dot products preserved in expectation.
    Deterministic, so every rank computes the same values.
    """
    rows, d = table.shape
    if method == "random":
        g = torch.Generator().manual_seed(seed)
        return table @ (torch.randn(d, dim, generator=g, dtype=torch.float64) / math.sqrt(dim)).to(table.dtype)
    x = table[known_from:].double()
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    k = min(dim, vh.shape[0])
    out = table.double() @ vh[:k].T
    if k < dim:
        out = torch.cat([out, out.new_zeros(rows, dim - k)], dim=1)
    return out.to(table.dtype)


# ---------------------------------------------------------------------------------------------- bookkeeping

def _own_init_entries(model: nn.Module, inner: nn.Module, report: TransferReport, done: set[str], reason: str,
                      reasons: Mapping[str, str] | None = None) -> None:
    for slot in all_table_slots(inner):
        if slot.key in done:
            continue
        report.tables.append(TableEntry(OWN_INIT, target=slot.name, target_shape=list(slot.shape),
                                        reason=(reasons or {}).get(slot.key, reason), frozen=slot.is_frozen(model)))


def _count(model: nn.Module, inner: nn.Module, report: TransferReport) -> None:
    """Trainable / frozen parameter counts (global sizes for sharded tables)."""
    trainable = frozen = 0
    sharded_keys: set[str] = set()
    if is_dmp(model):
        state = inner.state_dict()
        for key, value in state.items():
            if is_table_key(key) and type(value).__name__ == "ShardedTensor":
                sharded_keys.add(key)
                n = math.prod(value.size())
                if sharded_learning_rate(model, key) == 0.0:
                    frozen += n
                else:
                    trainable += n
    seen: set[int] = set()
    for name, p in inner.named_parameters():
        if name in sharded_keys or id(p) in seen:
            continue
        seen.add(id(p))
        if p.requires_grad:
            trainable += p.numel()
        else:
            frozen += p.numel()
    report.trainable_params, report.frozen_params = trainable, frozen
    covered = sum(math.prod(e.target_shape) for e in report.tables if e.target and e.target_shape)
    covered += sum(m.params for m in report.modules if m.target)
    report.other_params = max(0, trainable + frozen - covered)


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _submodule(inner: nn.Module, path: str) -> nn.Module:
    try:
        return inner.get_submodule(path)
    except AttributeError:
        import difflib

        paths = [p for p, _ in inner.named_modules() if p]
        close = difflib.get_close_matches(path, paths, n=3)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise TransferError(f"backbone_paths: the model has no module '{path}'{hint}") from None


def _as_dict(feature_map: Any) -> Mapping:
    if hasattr(feature_map, "to_dict"):
        return feature_map.to_dict()
    if isinstance(feature_map, Mapping) and "vocabularies" in feature_map:
        return feature_map
    raise TransferError(f"feature map: expected a FeatureMap or its dict form (with 'vocabularies'), got "
                        f"{type(feature_map).__name__}")


def _features(fm: Mapping) -> set[str]:
    return set(fm.get("vocabularies", {})) | set(fm.get("shared", {}))
