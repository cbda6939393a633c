"""hybrid: generative pretraining (GPSD style) for discriminative CTR models, in one import namespace.

=====================  =====================================================================================
``hybrid.core``        what every part shares: errors, the feature map, batch types, config loader,
                       checkpoint I/O, backbones, the distributed training runtime
``hybrid.pretrain``    the generative model, its objectives, trainer and checkpoint layout
``hybrid.ctr_models``  the rankers (DCN-v2, MoE, TIN, GPSD ranker), multimodal features, CTR trainer
``hybrid.adapters``    transfer strategies (NT / FT / ST / FT&SF / ST&SF), table maps, freezing, reports
``hybrid.data``        readers, protocols, the batch converter, item vectors
``hybrid.jobs``        the stages behind the CLI: prepare, pretrain, finetune, sweep, quickstart
=====================  =====================================================================================

Importing ``hybrid`` itself loads nothing heavy (no torch), so ``hybrid --version`` and the dependency
check run on any machine.
"""
__version__ = "0.2.0"
