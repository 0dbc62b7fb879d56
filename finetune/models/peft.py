"""Parameter-efficient fine-tuning for GPT-2 (``finetune.models.gpt2``) and the Llama family
(``finetune.models.llama``): LoRA, BiTFiT, norm-only tuning and Houlsby adapters.

* LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", arXiv 2106.09685):
  a frozen Dense weight W [out, in] gets a trainable low-rank update,
  ``y = x W^T + b + (alpha / r) * (x A^T) B^T`` with ``A`` [r, in] random and ``B`` [out, r] zero,
  so the adapted model starts exactly at the base model. Yu et al. (ICLR 2022) use it for DP
  fine-tuning: only A and B are privatised. ``merge_lora`` folds the update into W (for export);
  ``unmerge_lora`` restores the exact pre-merge weights (a copy is kept, no float round-off).
* BiTFiT (Ben Zaken et al., arXiv 2106.10199; DP-BiTFiT: Bu et al., arXiv 2210.00036): every
  weight frozen, only bias terms (Dense and LayerNorm biases) train.
* Norm-only (``apply_norm_only``, Llama family): only the RMSNorm gains train. Llama and Mistral have
  no bias terms at all, so this is their analogue of BiTFiT (a per-channel affine knob per layer).
* Houlsby adapters (Houlsby et al., "Parameter-Efficient Transfer Learning for NLP", ICML 2019, Sec.
  2.1): after the attention output projection and after the MLP output projection, before the
  residual sum, ``h + up(act(down(h)))`` with a bottleneck of ``size`` units. ``down`` and ``up``
  are plain ``Linear`` layers (with bias); ``up`` starts at zero, so the adapted model starts exactly
  at the base model. Only the adapters train (Houlsby et al. also train the layer norms; combine
  with nothing else here, so the trained set stays one method).

Parameter names: a LoRA layer keeps the Hugging Face names of its base weights and adds
``<layer>.lora_A`` / ``<layer>.lora_B`` (e.g. ``transformer.h.0.attn.c_attn.lora_A``); an adapted
layer adds ``<layer>.adapter_down.{weight,bias}`` and ``<layer>.adapter_up.{weight,bias}``.

    from finetune.models.peft import apply_lora, apply_bitfit, trainable_parameter_names, save_adapter
    apply_lora(model, r=8, alpha=16, targets=("c_attn",))   # Llama: targets=("q_proj", "v_proj")
    # or apply_bitfit(model) / apply_norm_only(llama) / apply_adapters(model, size=16)
    model.trainable_params()                                 # only what the method trains
    save_adapter(model, "adapter.safetensors")               # only the trained tensors
    load_adapter(model2, "adapter.safetensors")              # re-applies LoRA from the metadata

Book-keeping with LoRA: a LoRA layer is still one tap; its saved activation is its input x and its
probe sits on its full output y, so for output gradient g: dL/dB = (alpha/r) sum_t g_t (A x_t)^T and
dL/dA = (alpha/r) sum_t (B^T g_t) x_t^T.

Note: ``merged`` is a Python attribute read when a graph is compiled; rebuild ``ms.jit`` functions
after merging or unmerging (``finetune.models.gpt2.generate`` does this itself). Weights are written in
place (``finetune.models.gpt2.assign_parameter``), so graphs compiled before a load or merge see the new
values.
"""
from __future__ import annotations

import json
import os
import re

import numpy as np

from mindspore import ops

from .gpt2 import (Linear, _gelu_tanh, _param, _per_example, assign_parameter,
                   refresh_parameter_names)

__all__ = ["LoRALinear", "AdaptedLinear", "apply_lora", "apply_bitfit", "apply_norm_only",
           "apply_adapters", "merge_lora", "unmerge_lora", "lora_layers", "adapter_layers",
           "trainable_parameter_names", "is_adapter_name", "save_adapter", "load_adapter",
           "AdapterError", "METHODS"]

ADAPTER_SUFFIXES = (".lora_A", ".lora_B")
_ADAPTER_PART = re.compile(r"\.adapter_(down|up)\.(weight|bias)$")
METHODS = ("lora", "bitfit", "norm_only", "houlsby")


class AdapterError(ValueError):
    """An adapter file or request does not fit the model."""


def is_adapter_name(name: str) -> bool:
    """True for parameters a PEFT method adds (LoRA A/B, Houlsby adapters), not base weights."""
    return name.endswith(ADAPTER_SUFFIXES) or bool(_ADAPTER_PART.search(name))


def _is_llama(model) -> bool:
    return hasattr(model, "model") and hasattr(model.model, "layers")


class LoRALinear(Linear):
    """A ``Linear`` with a frozen base weight and a trainable rank-r update (see module docstring)."""

    def __init__(self, base: Linear, r: int, alpha: float, rng: np.random.Generator):
        # deliberately not Linear.__init__: reuse the base Parameters (same objects, same data)
        super(Linear, self).__init__()
        self.n_in, self.n_out = base.n_in, base.n_out
        self.weight = base.weight
        self.bias = base.bias
        self.r = int(r)
        self.alpha = float(alpha)
        self.scaling = self.alpha / self.r
        # A ~ N(0, 1/in) (random, as in Hu et al.), B = 0 so the update starts at zero
        self.lora_A = _param(rng.normal(0.0, 1.0 / np.sqrt(self.n_in), (self.r, self.n_in)), "lora_A")
        self.lora_B = _param(np.zeros((self.n_out, self.r)), "lora_B")
        self.merged = False
        self._premerge_weight = None

    def construct(self, x, probe=None):
        if probe is not None and _per_example(probe):
            y = ops.dense(x, self.weight) + (probe if self.bias is None else self.bias + probe)
        else:
            y = ops.dense(x, self.weight, self.bias)
        if not self.merged:
            y = y + ops.dense(ops.dense(x, self.lora_A), self.lora_B) * self.scaling
        if probe is not None and not _per_example(probe):
            y = y + probe
        return y

    def delta_weight(self) -> np.ndarray:
        """scaling * B A in float64, the update merge adds to W."""
        return self.scaling * (self.lora_B.asnumpy().astype(np.float64)
                               @ self.lora_A.asnumpy().astype(np.float64))

    def merge(self) -> None:
        if self.merged:
            return
        w = self.weight.asnumpy()
        self._premerge_weight = w.copy()
        assign_parameter(self.weight, (w.astype(np.float64) + self.delta_weight()).astype(np.float32))
        self.merged = True

    def unmerge(self) -> None:
        if not self.merged:
            return
        merged_now = self.weight.asnumpy()
        expected = (self._premerge_weight.astype(np.float64) + self.delta_weight()).astype(np.float32)
        if np.array_equal(merged_now, expected):
            restored = self._premerge_weight            # exact: nothing changed since merge
        else:                                            # weight or adapter changed: subtract
            restored = (merged_now.astype(np.float64) - self.delta_weight()).astype(np.float32)
        assign_parameter(self.weight, restored)
        self._premerge_weight = None
        self.merged = False


class AdaptedLinear(Linear):
    """A frozen ``Linear`` followed by a Houlsby bottleneck adapter (see module docstring):
    ``h = x W^T + b``, ``y = h + up(gelu(down(h)))``; ``down`` [size, out], ``up`` [out, size], both
    ``Linear`` with bias; ``up`` starts at zero so ``y == h`` at initialisation.

    Book-keeping: three taps (the frozen projection, ``down`` and ``up``), each an ordinary linear
    tap whose input is kept: ``x``, ``h`` and ``gelu(down(h))`` (:meth:`tapped`)."""

    n_taps = 3

    def __init__(self, base: Linear, size: int, rng: np.random.Generator):
        super(Linear, self).__init__()          # reuse the base Parameters, as LoRALinear does
        self.n_in, self.n_out = base.n_in, base.n_out
        self.weight = base.weight
        self.bias = base.bias
        self.size = int(size)
        # Houlsby et al. initialise the adapter near the identity: small random down, zero up
        self.adapter_down = Linear(self.n_out, self.size, rng, 1.0 / np.sqrt(self.n_out))
        self.adapter_up = Linear(self.size, self.n_out, rng, 0.0)

    def construct(self, x, probe=None):
        h = ops.dense(x, self.weight, self.bias)
        if probe is not None:
            h = h + probe
        return h + self.adapter_up(_gelu_tanh(self.adapter_down(h)))

    def taps(self):
        return (self, self.adapter_down, self.adapter_up)

    def tapped(self, x, p):
        """The forward with probes ``p`` (3) at the projection, ``down`` and ``up``; returns
        (y, (x, h, gelu(down(h))))."""
        if self.bias is None:
            h = ops.dense(x, self.weight) + p[0]
        elif _per_example(p[0]):
            h = ops.dense(x, self.weight) + (self.bias + p[0])
        else:
            h = ops.dense(x, self.weight, self.bias) + p[0]
        a = _gelu_tanh(self.adapter_down(h, p[1]))
        return h + self.adapter_up(a, p[2]), (x, h, a)


def _linear_layers(model):
    return [(n, c) for n, c in model.cells_and_names() if isinstance(c, Linear)]


def lora_layers(model):
    """[(name, LoRALinear)] in model order."""
    return [(n, c) for n, c in model.cells_and_names() if isinstance(c, LoRALinear)]


def adapter_layers(model):
    """[(name, AdaptedLinear)] in model order."""
    return [(n, c) for n, c in model.cells_and_names() if isinstance(c, AdaptedLinear)]


def _set_child(model, dotted: str, new) -> None:
    parent_name, _, attr = dotted.rpartition(".")
    parent = dict(model.cells_and_names())[parent_name] if parent_name else model
    setattr(parent, attr, new)


def _freeze_all_but(model, keep) -> list:
    names = []
    for n, p in model.parameters_and_names():
        p.requires_grad = bool(keep(n))
        if p.requires_grad:
            names.append(n)
    return names


def _check_base(model, method: str) -> None:
    """One PEFT method per model: refuse to stack a second one on top of LoRA or adapters."""
    if lora_layers(model) or adapter_layers(model):
        have = "LoRA" if lora_layers(model) else "Houlsby adapter"
        raise AdapterError(f"{method} on a model with {have} layers is not supported; start from the base model")


DEFAULT_LORA_TARGETS = {"gpt2": ("c_attn",), "llama": ("q_proj", "v_proj")}


def apply_lora(model, r: int = 8, alpha: float = 16.0, targets=None, seed: int = 0) -> list:
    """Replace every Dense layer whose name matches one of ``targets`` (regular expressions searched
    in names like ``transformer.h.3.attn.c_attn`` or ``model.layers.3.self_attn.q_proj``) by a LoRA
    layer; freeze everything else. Default targets: ``c_attn`` (GPT-2), ``q_proj``, ``v_proj``
    (Llama family, as in Hu et al.). Returns the adapted layer names."""
    if targets is None:
        targets = DEFAULT_LORA_TARGETS["llama" if _is_llama(model) else "gpt2"]
    if isinstance(targets, str):
        targets = (targets,)
    if not isinstance(r, (int, np.integer)) or r <= 0:
        raise AdapterError(f"LoRA rank r must be a positive integer, got {r!r}")
    if not alpha > 0:
        raise AdapterError(f"LoRA alpha must be positive, got {alpha!r}")
    if lora_layers(model):
        raise AdapterError("model already has LoRA layers")
    _check_base(model, "LoRA")
    pats = [re.compile(t) for t in targets]
    chosen = [(n, c) for n, c in _linear_layers(model) if any(p.search(n) for p in pats)]
    if not chosen:
        names = sorted({n.rsplit(".", 1)[-1] for n, _ in _linear_layers(model)})
        raise AdapterError(f"no Dense layer matches targets {list(targets)}; layer names end in {names}")
    rng = np.random.default_rng(seed)
    for n, c in chosen:
        if min(c.n_in, c.n_out) < r:
            raise AdapterError(f"rank {r} exceeds the size of {n} ({c.n_out}x{c.n_in})")
        _set_child(model, n, LoRALinear(c, r, alpha, rng))
    refresh_parameter_names(model)
    _freeze_all_but(model, is_adapter_name)
    model.peft = {"method": "lora", "r": int(r), "alpha": float(alpha), "targets": list(targets)}
    return [n for n, _ in chosen]


def apply_bitfit(model) -> list:
    """Freeze all weights; train only bias terms (Dense and LayerNorm). Returns their names.
    Llama and Mistral have no bias terms: use ``apply_norm_only`` for them."""
    _check_base(model, "BiTFiT")
    if not any(n.endswith(".bias") for n, _ in model.parameters_and_names()):
        raise AdapterError("BiTFiT: this model has no bias terms; use norm-only tuning (apply_norm_only)")
    names = _freeze_all_but(model, lambda n: n.endswith(".bias"))
    model.peft = {"method": "bitfit"}
    return names


def apply_norm_only(model) -> list:
    """Llama family: freeze everything but the RMSNorm gains (``*layernorm.weight``,
    ``model.norm.weight``). Returns their names. GPT-2 keeps BiTFiT (``apply_bitfit``)."""
    from .llama import RMSNorm

    if not _is_llama(model):
        raise AdapterError("norm-only tuning is for Llama-family models; use BiTFiT (apply_bitfit) for GPT-2")
    _check_base(model, "norm-only tuning")
    gains = {n + ".weight" if n else "weight" for n, c in model.cells_and_names() if isinstance(c, RMSNorm)}
    names = _freeze_all_but(model, lambda n: n in gains)
    model.peft = {"method": "norm_only"}
    return names


def _adapter_sites(model) -> list:
    """The two projections per block whose outputs Houlsby et al. adapt: attention output and MLP
    output (GPT-2 ``attn.c_proj``/``mlp.c_proj``; Llama ``self_attn.o_proj``/``mlp.down_proj``)."""
    pat = (re.compile(r"^model\.layers\.\d+\.(self_attn\.o_proj|mlp\.down_proj)$") if _is_llama(model)
           else re.compile(r"^transformer\.h\.\d+\.(attn|mlp)\.c_proj$"))
    return [(n, c) for n, c in _linear_layers(model) if pat.match(n)]


def apply_adapters(model, size: int = 16, seed: int = 0) -> list:
    """Insert a Houlsby bottleneck adapter of ``size`` units after the attention output and after
    the MLP output of every block; freeze everything else. Returns the adapted layer names."""
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size <= 0:
        raise AdapterError(f"adapter size must be a positive integer, got {size!r}")
    _check_base(model, "Houlsby adapters")
    rng = np.random.default_rng(seed)
    sites = _adapter_sites(model)
    for n, c in sites:
        _set_child(model, n, AdaptedLinear(c, size, rng))
    refresh_parameter_names(model)
    _freeze_all_but(model, is_adapter_name)
    model.peft = {"method": "houlsby", "size": int(size)}
    return [n for n, _ in sites]


def merge_lora(model) -> None:
    for _, layer in lora_layers(model):
        layer.merge()


def unmerge_lora(model) -> None:
    for _, layer in lora_layers(model):
        layer.unmerge()


def trainable_parameter_names(model) -> list:
    return [n for n, p in model.parameters_and_names() if p.requires_grad]


def _architecture(model) -> str:
    return model.config.model_type if _is_llama(model) else "gpt2"


def save_adapter(model, path) -> list:
    """Save only the trainable tensors (LoRA A/B, biases, norm gains or adapters) as safetensors,
    with the method (and the architecture) in the metadata. Returns the saved names."""
    from safetensors.numpy import save_file

    info = getattr(model, "peft", None)
    if not info:
        raise AdapterError("model has no PEFT method applied; use finetune.models.checkpoint for full weights")
    if info["method"] == "lora" and any(c.merged for _, c in lora_layers(model)):
        raise AdapterError("LoRA layers are merged; unmerge_lora(model) before saving the adapter")
    tensors = {n: p.asnumpy() for n, p in model.parameters_and_names() if p.requires_grad}
    save_file(tensors, os.fspath(path),
              metadata={"peft": json.dumps(dict(info, architecture=_architecture(model)))})
    return sorted(tensors)


def read_adapter_info(path) -> dict:
    """The ``peft`` metadata of an adapter file written by ``save_adapter``."""
    from safetensors import safe_open

    path = os.fspath(path)
    try:
        with safe_open(path, framework="numpy") as f:
            meta = f.metadata() or {}
        info = json.loads(meta["peft"])
    except (KeyError, json.JSONDecodeError):
        raise AdapterError(f"{path}: not an adapter file (no 'peft' metadata)") from None
    except Exception as e:
        raise AdapterError(f"cannot read adapter file {path}: {e}") from None
    if not isinstance(info, dict) or info.get("method") not in METHODS:
        raise AdapterError(f"{path}: unknown adapter method {info.get('method') if isinstance(info, dict) else info!r}")
    return info


def load_adapter(model, path) -> list:
    """Load a file written by ``save_adapter``. The method is applied first if the model has none
    yet (LoRA rank, alpha and targets, or the adapter size, from the file). Raises AdapterError on
    a different method or architecture and on missing/mismatched tensors."""
    from safetensors.numpy import load_file

    path = os.fspath(path)
    info = read_adapter_info(path)
    try:
        tensors = load_file(path)
    except Exception as e:
        raise AdapterError(f"cannot read adapter file {path}: {e}") from None
    arch = info.pop("architecture", None)
    if arch is not None and arch != _architecture(model):
        raise AdapterError(f"{path}: adapter for a {arch} model, this model is {_architecture(model)}")
    method = info["method"]
    have = getattr(model, "peft", None)
    if have and have.get("method") != method:
        raise AdapterError(f"{path}: a {method} adapter, but the model has {have.get('method')} applied")
    if method == "lora":
        if not lora_layers(model):
            apply_lora(model, r=info["r"], alpha=info["alpha"], targets=info["targets"])
        elif have.get("r") != info["r"] or have.get("alpha") != info["alpha"]:
            raise AdapterError(f"{path}: LoRA rank/alpha {info['r']}/{info['alpha']} != model's "
                               f"{have.get('r')}/{have.get('alpha')}")
    elif method == "houlsby":
        if not adapter_layers(model):
            apply_adapters(model, size=info["size"])
        elif have.get("size") != info["size"]:
            raise AdapterError(f"{path}: adapter size {info['size']} != model's {have.get('size')}")
    elif not have:
        (apply_bitfit if method == "bitfit" else apply_norm_only)(model)
    params = {n: p for n, p in model.parameters_and_names() if p.requires_grad}
    missing = sorted(set(params) - set(tensors))
    unexpected = sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise AdapterError(f"{path} does not fit the model: missing {missing[:3]} "
                           f"({len(missing)}), unexpected {unexpected[:3]} ({len(unexpected)})")
    for n, p in params.items():
        if tuple(tensors[n].shape) != tuple(p.shape):
            raise AdapterError(f"{path}: {n} has shape {tuple(tensors[n].shape)}, model expects "
                               f"{tuple(p.shape)}")
    for n, p in params.items():
        assign_parameter(p, tensors[n])
    return sorted(params)
