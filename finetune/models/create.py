"""Write a random-init Llama-family checkpoint folder, the layout of a Hugging Face upload.

    python -m finetune.models.create --preset llama-tiny --out my-llama [--model-type qwen2]

The folder holds ``config.json`` and ``model.safetensors`` (``finetune.models.checkpoint.save_pretrained``,
Hugging Face names) and the tokenizer as a checkpoint ships it: ``tokenizer.json`` (the ``tokenizers``
format; here GPT-2's byte-level BPE cut to the preset's vocabulary, ``finetune.models.tokenizer``) and
``tokenizer_config.json`` naming the end-of-sequence token. ``python -m finetune --model my-llama``
and ``finetune.models.checkpoint.from_pretrained("my-llama")`` read it like a downloaded checkpoint,
so the whole Llama path (loading, DP fine-tuning, export) can be tried offline.

``--model-type qwen2`` writes the Qwen2 variant of the preset (q/k/v biases, output head tied to the
embedding); ``mistral`` the Mistral one (no biases, no sliding window). The weights are random (the
preset's public initialisation seed ``--init-seed``, default 0): the folder is for trying the tools, not a
language model. An existing ``--out`` is refused unless ``--overwrite``; mistakes end in one line,
exit code 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile

from accountant import cli_common

PROG = "python -m finetune.models.create"
PRESETS = ("llama-tiny", "llama-100m")


class _Parser(cli_common.OneLineParser):
    """Usage mistakes in one line, ``PROG: error: ...``, exit code 2 (as the finetune programs)."""

    name_the_program = True


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Write a random-init Llama-family checkpoint folder "
                                             "(config.json, model.safetensors, tokenizer.json).")
    p.add_argument("--preset", required=True, choices=PRESETS, help="model shape")
    p.add_argument("--out", required=True, help="folder to create (refused if it exists, unless --overwrite)")
    p.add_argument("--model-type", default="llama", choices=("llama", "qwen2", "mistral"),
                   help="family of config.json (default llama; qwen2: q/k/v biases and a tied head)")
    p.add_argument("--init-seed", type=int, default=0,
                   help="seed of the random initial weights (public, not a privacy seed; default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return p


def config_for(preset: str, model_type: str = "llama"):
    """The preset's ``LlamaConfig`` in the family ``model_type``."""
    from .llama import LlamaConfig

    cfg = LlamaConfig.preset(preset)
    if model_type == "qwen2":
        return dataclasses.replace(cfg, model_type="qwen2", qkv_bias=True, o_bias=False,
                                   tie_word_embeddings=True)
    return dataclasses.replace(cfg, model_type=model_type)


def write_checkpoint(directory: str, preset: str, model_type: str = "llama", seed: int = 0) -> None:
    """Write the random-init checkpoint of ``preset`` (see module docstring) into ``directory``."""
    from .checkpoint import save_pretrained
    from .llama import LlamaForCausalLM
    from .tokenizer import EOS_TOKEN, load_tokenizer

    cfg = config_for(preset, model_type)
    save_pretrained(LlamaForCausalLM(cfg, seed=seed), directory)
    load_tokenizer(cfg.vocab_size)._tok.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN}, f, indent=2)
        f.write("\n")


def main(argv=None) -> int:
    from accountant.output_path import OutputPathError, check_output_dir

    try:
        args = _parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    except SystemExit as e:            # usage mistake (one line already printed) or --help
        return e.code if isinstance(e.code, int) else 2
    out = os.path.normpath(args.out)
    try:
        check_output_dir(out, overwrite=args.overwrite, what="--out")
    except OutputPathError as e:
        sys.stderr.write(f"{PROG}: error: {e}\n")
        return 2
    parent = os.path.dirname(os.path.abspath(out))
    stage = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.staging-", dir=parent)
    try:
        write_checkpoint(stage, args.preset, args.model_type, args.init_seed)
        if os.path.exists(out):        # --overwrite: replaced only once the new folder is complete
            shutil.rmtree(out)
        os.rename(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    print(f"wrote a random-init {args.model_type} checkpoint ({args.preset}) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
