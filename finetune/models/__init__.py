"""Models: a MindSpore GPT-2 and the Llama/Qwen2/Mistral decoder with Hugging Face parameter names
(``gpt2``, ``llama``), checkpoint loading and saving (``checkpoint``: safetensors and MindSpore
``.ckpt``), parameter-efficient fine-tuning (``peft``: LoRA, BiTFiT, norm-only, Houlsby adapters) and
tokenizers (``tokenizer``: GPT-2 BPE, or a checkpoint's ``tokenizer.json``).

Nothing here knows about privacy and nothing here imports ``finetune.dp``, the engine or the
programs; a model exposes what per-example book-keeping needs through the taps protocol the
per-example code documents (docs/architecture.md, "A new model").
"""
