"""Load and save model weights: Hugging Face safetensors and MindSpore .ckpt.

``from_pretrained(DIR)`` dispatches on ``config.json``'s ``model_type``: ``gpt2`` builds
``finetune.models.gpt2.GPT2LMHeadModel``; ``llama``, ``qwen2`` and ``mistral`` build
``finetune.models.llama.LlamaForCausalLM``, whose parameter names are Hugging Face's own (no
transposes; ``lm_head.weight``, when a tied checkpoint stores it, must equal the token embedding).
bfloat16 tensors (the usual dtype of Llama-family uploads; numpy has no bfloat16) are widened to
float32 exactly, by their bit pattern.

The rest of this docstring is about GPT-2.

Hugging Face GPT-2 files (``config.json`` + ``model.safetensors``, optionally sharded with
``model.safetensors.index.json``) use ``Conv1D`` layers whose weights are stored [in, out]; this
model stores Dense weights [out, in] for ``ops.dense``. The four Conv1D weights per block
(``attn.c_attn``, ``attn.c_proj``, ``mlp.c_fc``, ``mlp.c_proj``) are transposed on the way in and
out. Keys may carry the ``transformer.`` prefix (``GPT2LMHeadModel.save_pretrained``) or not
(``GPT2Model`` files such as the original ``gpt2`` upload). The causal-mask buffers
``attn.bias`` / ``attn.masked_bias`` of old files are ignored; ``lm_head.weight``, if present,
must equal the token embedding (GPT-2 ties them).

Nothing here unpickles: safetensors is a flat tensor format and MindSpore .ckpt is protobuf.
PyTorch ``pytorch_model.bin`` files (pickles) are refused.

    from finetune.models.checkpoint import from_pretrained, save_pretrained
    model = from_pretrained("tiny")                 # preset, random init
    model = from_pretrained("path/to/gpt2-dir")     # config.json + model.safetensors (or model.ckpt)
    save_pretrained(model, "out-dir")               # config.json + model.safetensors (HF layout;
                                                    # GPT-2 or Llama family)
    save_pretrained(model, "out-dir", fmt="ckpt")   # config.json + model.ckpt (MindSpore names)
"""
from __future__ import annotations

import json
import os
import re

import numpy as np

import mindspore as ms

from .gpt2 import GPT2Config, GPT2LMHeadModel, assign_parameter

__all__ = ["CheckpointError", "hf_state_dict", "load_hf_state_dict", "load_safetensors",
           "save_safetensors", "load_ckpt", "save_ckpt", "from_pretrained", "save_pretrained"]

_CONV1D = re.compile(r"^transformer\.h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")
_BUFFERS = re.compile(r"^transformer\.h\.\d+\.attn\.(bias|masked_bias)$")


class CheckpointError(ValueError):
    """A checkpoint does not fit the model (missing, unexpected or mis-shaped tensors)."""


def _base_params(model: GPT2LMHeadModel):
    """(name, Parameter) of the GPT-2 weights proper (adapter parameters such as LoRA excluded)."""
    from .peft import is_adapter_name  # local import: peft imports gpt2, not the reverse

    return [(n, p) for n, p in model.parameters_and_names() if not is_adapter_name(n)]


def hf_state_dict(model: GPT2LMHeadModel) -> dict:
    """The model's weights as a Hugging Face GPT-2 state dict (numpy float32, Conv1D [in, out])."""
    out = {}
    for name, p in _base_params(model):
        a = p.asnumpy()
        out[name] = np.ascontiguousarray(a.T) if _CONV1D.match(name) else a
    return out


def _normalise_key(k: str) -> str:
    return k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k


def _key_problems(missing, unexpected) -> list[str]:
    """One-line descriptions of missing and unexpected checkpoint keys (shared by both formats)."""
    missing, unexpected = sorted(missing), sorted(unexpected)
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} key(s), e.g. {missing[:3]}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} key(s), e.g. {unexpected[:3]}")
    return problems


def load_hf_state_dict(model: GPT2LMHeadModel, state: dict, source: str = "state dict") -> None:
    """Copy a Hugging Face GPT-2 state dict into ``model``; raises CheckpointError on any mismatch."""
    params = dict(_base_params(model))
    arrays, unexpected = {}, []
    lm_head = None
    for k, v in state.items():
        key = _normalise_key(k)
        if _BUFFERS.match(key):
            continue
        if key == "lm_head.weight":
            lm_head = v
            continue
        if key not in params:
            unexpected.append(k)
            continue
        arrays[key] = v
    problems = _key_problems(set(params) - set(arrays), unexpected)
    for key, v in arrays.items():
        want = tuple(params[key].shape)
        if _CONV1D.match(key):
            want = want[::-1]
        if tuple(v.shape) != want:
            problems.append(f"{key}: shape {tuple(v.shape)} in file, model expects {want}"
                            + (" (Hugging Face Conv1D layout [in, out])" if _CONV1D.match(key) else ""))
    if problems:
        raise CheckpointError(f"{source} does not match GPT2Config{model.config}: " + "; ".join(problems))
    if lm_head is not None:
        wte = arrays["transformer.wte.weight"]
        if lm_head.shape != wte.shape or not np.array_equal(lm_head, wte):
            raise CheckpointError(f"{source}: lm_head.weight differs from transformer.wte.weight; "
                                  "only tied GPT-2 heads are supported")
    for key, v in arrays.items():
        if v.dtype.kind != "f":
            raise CheckpointError(f"{source}: {key} has dtype {v.dtype}, expected a float tensor")
        a = v.T if _CONV1D.match(key) else v
        assign_parameter(params[key], a)


def _read_safetensors(path: str) -> dict:
    from safetensors import safe_open

    try:
        out = {}
        with safe_open(path, framework="numpy") as f:
            dtypes = {k: v.get("dtype") for k, v in _safetensors_header(path).items() if k != "__metadata__"}
            for key in f.keys():
                out[key] = _read_bf16(path, key) if dtypes.get(key) == "BF16" else f.get_tensor(key)
        return out
    except CheckpointError:
        raise
    except Exception as e:  # safetensors raises its own error types; give one clear line
        raise CheckpointError(f"cannot read safetensors file {path}: {e}") from None


def _safetensors_header(path: str) -> dict:
    """The JSON header of a safetensors file (format: 8-byte little-endian length, then the JSON)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if not 0 < n < 100_000_000:
            raise CheckpointError(f"{path}: not a safetensors file (header length {n})")
        return json.loads(f.read(n))


def _read_bf16(path: str, key: str) -> np.ndarray:
    """A bfloat16 tensor as float32: bfloat16 is the top half of a float32's bits, so the widening is
    exact.  (numpy has no bfloat16, so safetensors' numpy reader cannot return it.)"""
    header = _safetensors_header(path)
    info = header[key]
    begin, end = info["data_offsets"]
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        f.seek(8 + n + begin)
        raw = np.frombuffer(f.read(end - begin), dtype="<u2")
    if raw.size != int(np.prod(info["shape"])):
        raise CheckpointError(f"{path}: tensor {key} holds {raw.size} values for shape {info['shape']}")
    return (raw.astype(np.uint32) << 16).view(np.float32).reshape(info["shape"])


def load_safetensors(model: GPT2LMHeadModel, path: str) -> None:
    """Load a Hugging Face GPT-2 ``.safetensors`` file (or a sharded ``.index.json``) into ``model``."""
    path = os.fspath(path)
    load_hf_state_dict(model, _read_state(path), source=path)


def save_safetensors(model: GPT2LMHeadModel, path: str) -> None:
    """Write the base weights in Hugging Face GPT-2 layout (adapters excluded: merge them first)."""
    from safetensors.numpy import save_file

    save_file(hf_state_dict(model), os.fspath(path), metadata={"format": "pt"})


def save_ckpt(model: GPT2LMHeadModel, path: str) -> None:
    """MindSpore .ckpt with this model's parameter names ([out, in] Dense weights), base weights only."""
    ms.save_checkpoint([{"name": n, "data": p.data} for n, p in _base_params(model)], os.fspath(path))


def load_ckpt(model: GPT2LMHeadModel, path: str) -> None:
    """Load a MindSpore .ckpt written by ``save_ckpt`` (exact names and shapes required)."""
    path = os.fspath(path)
    try:
        loaded = ms.load_checkpoint(path)
    except Exception as e:
        raise CheckpointError(f"cannot read MindSpore checkpoint {path}: {e}") from None
    params = dict(_base_params(model))
    problems = _key_problems(set(params) - set(loaded), set(loaded) - set(params))
    for k in set(params) & set(loaded):
        if tuple(loaded[k].shape) != tuple(params[k].shape):
            problems.append(f"{k}: shape {tuple(loaded[k].shape)} in file, model expects "
                            f"{tuple(params[k].shape)}")
    if problems:
        raise CheckpointError(f"{path} does not match GPT2Config{model.config}: " + "; ".join(problems))
    for k, p in params.items():
        assign_parameter(p, loaded[k].asnumpy())


LLAMA_PRESETS = ("llama-tiny", "llama-100m")


def _read_state(path: str) -> dict:
    """Every tensor of a safetensors file or of the shards a ``.index.json`` names."""
    if not path.endswith(".index.json"):
        return _read_safetensors(path)
    with open(path, encoding="utf-8") as f:
        weight_map = json.load(f).get("weight_map", {})
    state = {}
    for shard in sorted(set(weight_map.values())):
        state.update(_read_safetensors(os.path.join(os.path.dirname(path), shard)))
    return state


def load_llama_safetensors(model, path: str) -> None:
    """Load a Hugging Face Llama / Qwen2 / Mistral ``.safetensors`` (or sharded index) into ``model``."""
    path = os.fspath(path)
    state = _read_state(path)
    params = dict(model.parameters_and_names())
    lm_head = state.pop("lm_head.weight", None) if model.config.tie_word_embeddings else None
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}   # a derived buffer
    problems = _key_problems(set(params) - set(state), set(state) - set(params))
    for k in set(params) & set(state):
        if tuple(state[k].shape) != tuple(params[k].shape):
            problems.append(f"{k}: shape {tuple(state[k].shape)} in file, model expects {tuple(params[k].shape)}")
        elif state[k].dtype.kind != "f":
            problems.append(f"{k} has dtype {state[k].dtype}, expected a float tensor")
    if problems:
        raise CheckpointError(f"{path} does not match the config: " + "; ".join(problems))
    if lm_head is not None and not np.array_equal(lm_head, state["model.embed_tokens.weight"]):
        raise CheckpointError(f"{path}: config.json ties the head to the embedding but lm_head.weight differs")
    for k, p in params.items():
        assign_parameter(p, state[k])


def _from_llama_dir(p: str, cfg: dict, seed: int):
    from .llama import LlamaConfig, LlamaForCausalLM

    try:
        model = LlamaForCausalLM(LlamaConfig.from_dict(cfg), seed=seed)
    except ValueError as e:
        raise CheckpointError(f"{p}/config.json: {e}") from None
    for fname in ("model.safetensors", "model.safetensors.index.json"):
        if os.path.exists(os.path.join(p, fname)):
            load_llama_safetensors(model, os.path.join(p, fname))
            return model
    raise CheckpointError(f"{p}: no model.safetensors or model.safetensors.index.json found")


def from_pretrained(name_or_path: str, seed: int = 0):
    """A preset name (GPT-2 ``tiny``/``small``, ``llama-tiny``/``llama-100m``: random init with
    ``seed``) or a directory holding a Hugging Face ``config.json`` and ``model.safetensors`` /
    ``model.safetensors.index.json`` (GPT-2 also ``model.ckpt``); dispatches on ``model_type``."""
    p = os.fspath(name_or_path)
    if p in ("tiny", "small"):
        return GPT2LMHeadModel(GPT2Config.preset(p), seed=seed)
    if p in LLAMA_PRESETS:
        from .llama import LlamaConfig, LlamaForCausalLM

        return LlamaForCausalLM(LlamaConfig.preset(p), seed=seed)
    if not os.path.isdir(p):
        raise CheckpointError(f"{p!r} is neither a preset (tiny, small, {', '.join(LLAMA_PRESETS)}) nor a "
                              "model directory")
    cfg_path = os.path.join(p, "config.json")
    if not os.path.exists(cfg_path):
        raise CheckpointError(f"{p}: no config.json (a Hugging Face config is required)")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{cfg_path}: not a JSON object")
    if cfg.get("model_type", "gpt2") != "gpt2":
        return _from_llama_dir(p, cfg, seed)
    model = GPT2LMHeadModel(GPT2Config.from_dict(cfg), seed=seed)
    for fname, loader in (("model.safetensors", load_safetensors),
                          ("model.safetensors.index.json", load_safetensors),
                          ("model.ckpt", load_ckpt)):
        f = os.path.join(p, fname)
        if os.path.exists(f):
            loader(model, f)
            return model
    if os.path.exists(os.path.join(p, "pytorch_model.bin")):
        raise CheckpointError(f"{p}: only pytorch_model.bin found; it is a pickle and is not loaded. "
                              "Convert it to model.safetensors first.")
    raise CheckpointError(f"{p}: no model.safetensors or model.ckpt found")


def save_llama_safetensors(model, path: str) -> None:
    """Write a Llama-family model's base weights with Hugging Face names (no transposes; a tied head
    is not stored, as Hugging Face does not store it). Adapters excluded: merge them first."""
    from safetensors.numpy import save_file

    save_file({n: p.asnumpy() for n, p in _base_params(model)}, os.fspath(path), metadata={"format": "pt"})


def save_pretrained(model, directory: str, fmt: str = "safetensors") -> str:
    """Write ``config.json`` plus ``model.safetensors`` (HF layout) or ``model.ckpt`` (GPT-2 only);
    returns the weights path."""
    from .llama import LlamaForCausalLM

    if fmt not in ("safetensors", "ckpt"):
        raise ValueError(f"fmt must be 'safetensors' or 'ckpt', got {fmt!r}")
    llama = isinstance(model, LlamaForCausalLM)
    if llama and fmt != "safetensors":
        raise ValueError("Llama-family models are saved as safetensors only")
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    model.config.to_json(os.path.join(directory, "config.json"))
    out = os.path.join(directory, "model." + fmt)
    (save_llama_safetensors if llama else save_safetensors if fmt == "safetensors" else save_ckpt)(model, out)
    return out
