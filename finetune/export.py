"""Export a trained run for the Hugging Face ecosystem: a PEFT LoRA adapter, or a merged checkpoint.

    python -m finetune.export --run RUN_DIR --out ADAPTER_DIR [--merge] [--overwrite]

``RUN_DIR`` is a folder written by ``python -m finetune`` (``metrics.json`` naming the base model and
the method, ``adapter.safetensors``, and for a private run ``ledger.json``).

Without ``--merge`` (LoRA runs only) the folder holds a PEFT LoRA adapter, the layout
``peft.PeftModel.from_pretrained`` reads (PEFT ``LoraConfig`` and ``get_peft_model_state_dict``):

* ``adapter_config.json``: ``peft_type "LORA"``, ``task_type "CAUSAL_LM"``, ``r``, ``lora_alpha``
  (PEFT's scaling is ``lora_alpha / r``, as here), ``target_modules``, ``base_model_name_or_path``,
  ``bias "none"``, ``lora_dropout 0``, and ``fan_in_fan_out`` (true for GPT-2, whose Hugging Face
  layers are ``Conv1D`` with weights stored [in, out]).
* ``adapter_model.safetensors``: ``base_model.model.<module path>.lora_A.weight`` [r, in] and
  ``.lora_B.weight`` [out, r]. PEFT builds ``lora_A = nn.Linear(in, r)`` and
  ``lora_B = nn.Linear(r, out)`` for ``Conv1D`` layers too (it reads ``in, out`` from the Conv1D
  weight's [in, out] shape) and transposes only the product ``B A`` when it merges into a Conv1D
  (``fan_in_fan_out``); so this library's A [r, in] and B [out, r] are written as they are, for
  both architectures (PEFT ``tuners/lora/layer.py``: ``LoraLayer.__init__``, ``update_layer``,
  ``Linear.get_delta_weight``).

``target_modules`` is the list of module names (e.g. ``["c_attn"]``, ``["q_proj", "v_proj"]``) when
the run adapted every layer of those names; otherwise a regular expression PEFT matches against the
full module path (``re.fullmatch``) naming exactly the adapted layers.

With ``--merge`` the folder is a full Hugging Face checkpoint (``config.json`` + ``model.safetensors``,
GPT-2 in the Conv1D layout), the adapter folded into the weights, so serving costs nothing extra;
``finetune.models.checkpoint.from_pretrained`` reads it back. BiTFiT and norm-only runs merge too
(their trained tensors simply replace the base ones); Houlsby adapters add layers and cannot be
merged. The base model's tokenizer files are copied along when it is a folder that has them.

Either way ``dp_metadata.json`` carries the privacy statement of the run: epsilon and delta as the
run's ``ledger.json`` records them (checked against ``metrics.json``), the privacy unit (``record``
unless the run says otherwise), the neighbouring relation, and the sha256 of ``ledger.json`` and of
the noise table. The folder is written in a staging sibling and renamed into place; an existing
``--out`` is refused unless ``--overwrite``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import tempfile

from .checkpointing import file_sha256
from .cli import OneLineParser, Stopper, UserError, exit_at_once

PROG = "python -m finetune.export"
PEFT_PREFIX = "base_model.model."
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "generation_config.json")

__all__ = ["main", "peft_lora_state", "peft_lora_config", "PROG"]


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description="Export a run of python -m finetune as a PEFT LoRA adapter "
                                             "(or, with --merge, a merged Hugging Face checkpoint).")
    p.add_argument("--run", required=True, help="run folder written by python -m finetune")
    p.add_argument("--out", required=True, help="folder to create (refused if it exists, unless --overwrite)")
    p.add_argument("--merge", action="store_true",
                   help="write a full Hugging Face checkpoint with the adapter merged into the weights")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return p


def _read_json(path: str, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise UserError(f"{what} not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{what} is not readable JSON: {path} ({type(e).__name__})") from None
    if not isinstance(data, dict):
        raise UserError(f"{what} is not a JSON object: {path}")
    return data


# -- PEFT layout -------------------------------------------------------------------------------
def peft_lora_state(model) -> dict:
    """PEFT state dict of the model's LoRA layers: ``base_model.model.<path>.lora_{A,B}.weight``."""
    from .models.peft import lora_layers

    out = {}
    for name, layer in lora_layers(model):
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A.asnumpy()     # [r, in]
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B.asnumpy()     # [out, r]
    return out


def _target_modules(model):
    """Module names when every layer of those names is adapted, else an exact full-path regex."""
    from .models.peft import _linear_layers, lora_layers

    adapted = [n for n, _ in lora_layers(model)]
    leaves = sorted({n.rsplit(".", 1)[-1] for n in adapted})
    same_leaf = [n for n, _ in _linear_layers(model) if n.rsplit(".", 1)[-1] in leaves]
    if sorted(same_leaf) == sorted(adapted):
        return leaves
    return "^(?:" + "|".join(re.escape(n) for n in adapted) + ")$"


def peft_lora_config(model, base_model_name_or_path: str) -> dict:
    """``adapter_config.json`` of PEFT's ``LoraConfig`` for the model's LoRA layers."""
    from .models.peft import _is_llama

    info = model.peft
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": int(info["r"]), "lora_alpha": float(info["alpha"]), "lora_dropout": 0.0,
        "target_modules": _target_modules(model), "bias": "none",
        "fan_in_fan_out": not _is_llama(model), "modules_to_save": None, "inference_mode": True,
        "init_lora_weights": True, "use_rslora": False, "use_dora": False,
        "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None,
        "revision": None,
    }


# -- the run -----------------------------------------------------------------------------------
def _dp_metadata(run: str, metrics: dict) -> dict:
    """Privacy statement of the run; refuses when the record is missing or contradicts itself."""
    ledger_path = os.path.join(run, "ledger.json")
    private = metrics.get("private")
    if private is None:
        private = metrics.get("epsilon_spent") is not None or os.path.exists(ledger_path)
    unit = metrics.get("privacy_unit") or (metrics.get("run_args") or {}).get("privacy_unit") or "record"
    if not private:
        return {"private": False, "epsilon": None, "delta": None, "privacy_unit": None,
                "note": "trained without differential privacy: no privacy guarantee"}
    if not os.path.isfile(ledger_path):
        raise UserError(f"{run} is a private run but has no ledger.json; its privacy record is needed")
    ledger = _read_json(ledger_path, "ledger.json of the run")
    eps, delta = ledger.get("epsilon_spent"), ledger.get("delta")
    if not isinstance(eps, (int, float)) or not isinstance(delta, (int, float)) or not math.isfinite(eps):
        raise UserError(f"{ledger_path} does not record a finite epsilon_spent and a delta")
    for key, value in (("epsilon_spent", eps), ("delta", delta)):
        recorded = metrics.get(key)
        if recorded is not None and not math.isclose(float(recorded), float(value), rel_tol=1e-9, abs_tol=0.0):
            raise UserError(f"{run}: metrics.json {key} {recorded!r} differs from ledger.json {value!r}; "
                            "the run's privacy record is inconsistent")
    table = metrics.get("table_sha256")
    if not table:
        raise UserError(f"{run}/metrics.json does not record table_sha256 (the noise table of a private run)")
    return {"private": True, "epsilon": float(eps), "delta": float(delta), "privacy_unit": unit,
            "relation": ledger.get("relation"), "sampling": ledger.get("sampling"),
            "ledger_sha256": file_sha256(ledger_path), "noise_table_sha256": table,
            "steps": metrics.get("steps")}


def _load_run(run: str):
    """(metrics, base model name, model with the run's adapter loaded, adapter method)."""
    if not os.path.isdir(run):
        raise UserError(f"--run {run!r} is not a folder")
    metrics = _read_json(os.path.join(run, "metrics.json"), "metrics.json of the run")
    method = metrics.get("method")
    base = metrics.get("model")
    if not isinstance(base, str) or not base:
        raise UserError(f"{run}/metrics.json does not name the base model ('model')")
    if method == "full":
        raise UserError(f"{run} is a full fine-tuning run: its config.json and model.safetensors already form "
                        "a Hugging Face checkpoint; there is no adapter to export")
    weights = os.path.join(run, metrics.get("weights") or "adapter.safetensors")
    if os.path.basename(weights) != "adapter.safetensors" or not os.path.isfile(weights):
        raise UserError(f"{run} has no adapter.safetensors")
    from .models import checkpoint, peft

    try:
        info = peft.read_adapter_info(weights)
        model = checkpoint.from_pretrained(base)
        peft.load_adapter(model, weights)
    except (peft.AdapterError, checkpoint.CheckpointError) as e:
        raise UserError(str(e).splitlines()[0]) from None
    return metrics, base, model, info["method"]


def _write(args, stage: str) -> str:
    from safetensors.numpy import save_file

    from .models import checkpoint, peft

    metrics, base, model, method = _load_run(args.run)
    dp = _dp_metadata(args.run, metrics)
    if args.merge:
        if method == "houlsby":
            raise UserError("Houlsby adapters add layers to the model and cannot be merged into its weights")
        peft.merge_lora(model)
        checkpoint.save_pretrained(model, stage)
        if os.path.isdir(base):
            for name in TOKENIZER_FILES:
                if os.path.isfile(os.path.join(base, name)):
                    shutil.copyfile(os.path.join(base, name), os.path.join(stage, name))
        kind = "merged checkpoint"
    else:
        if method != "lora":
            raise UserError(f"the run trained with {method}, not LoRA; only LoRA has a PEFT adapter format "
                            "here (use --merge for a full checkpoint)")
        with open(os.path.join(stage, "adapter_config.json"), "w", encoding="utf-8") as f:
            json.dump(peft_lora_config(model, base), f, indent=2)
            f.write("\n")
        save_file(peft_lora_state(model), os.path.join(stage, "adapter_model.safetensors"),
                  metadata={"format": "pt"})
        kind = "PEFT LoRA adapter"
    with open(os.path.join(stage, "dp_metadata.json"), "w", encoding="utf-8") as f:
        json.dump(dict(dp, method=method, export=kind), f, indent=2)
        f.write("\n")
    return kind


_STAGE = []  # the staging folder of the export under way, for the signal handler


def export(args) -> str:
    """Check the options, write into a staging sibling of ``--out``, rename it into place."""
    from accountant.output_path import OutputPathError, check_output_dir

    out = os.path.normpath(args.out)
    try:
        check_output_dir(out, overwrite=args.overwrite, what="--out")
    except OutputPathError as e:
        raise UserError(str(e)) from None
    if os.path.abspath(out) == os.path.abspath(args.run):
        raise UserError("--out must not be the run folder")
    parent = os.path.dirname(os.path.abspath(out))
    stage = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.staging-", dir=parent)
    _STAGE.append(stage)
    try:
        kind = _write(args, stage)
        _STAGE.clear()                                # from here a signal lets the rename finish
        if os.path.exists(out):                       # --overwrite: swap, then drop the old folder
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=parent)
            os.rename(out, os.path.join(old, "x"))
            os.rename(stage, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    finally:
        _STAGE.clear()
    return kind


def main(argv=None) -> int:
    try:
        args = _parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    except SystemExit as e:            # usage mistake (one line already printed) or --help
        return e.code if isinstance(e.code, int) else 2
    try:
        with Stopper(on_signal=exit_at_once(PROG, _STAGE)):   # SIGINT/SIGTERM: no staging folder left
            kind = export(args)
    except UserError as e:
        sys.stderr.write(f"{PROG}: error: {e}\n")
        return 2
    print(f"wrote {kind} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
