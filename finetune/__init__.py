"""DP fine-tuning in MindSpore.

Layout (imports flow downwards only)::

    finetune.__main__, finetune.evaluate, finetune.data   command-line programs
    finetune.train                                        the training loop (CLI and API)
    finetune.evaluation                                   leakage and utility metrics
    finetune.dp                                           the DP engine (any MindSpore network)
    finetune.models                                       GPT-2, checkpoints, LoRA/BiTFiT, tokenizer
"""
