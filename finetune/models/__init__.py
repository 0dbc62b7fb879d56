"""Models: a MindSpore GPT-2 with Hugging Face parameter names (``gpt2``), checkpoint loading and
saving (``checkpoint``: safetensors and MindSpore ``.ckpt``), parameter-efficient fine-tuning
(``peft``: LoRA and BiTFiT) and the GPT-2 BPE tokenizer (``tokenizer``).

Nothing here knows about privacy; ``finetune.dp`` builds on these modules, never the reverse.
"""
