"""Models: a MindSpore GPT-2 and the Llama/Qwen2/Mistral decoder with Hugging Face parameter names
(``gpt2``, ``llama``), checkpoint loading and saving (``checkpoint``: safetensors and MindSpore
``.ckpt``), parameter-efficient fine-tuning (``peft``: LoRA, BiTFiT, norm-only, Houlsby adapters) and
tokenizers (``tokenizer``: GPT-2 BPE, or a checkpoint's ``tokenizer.json``).

Nothing here knows about privacy; ``finetune.dp`` builds on these modules, never the reverse.
"""
