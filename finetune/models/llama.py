"""The decoder of Llama, Qwen2 and Mistral checkpoints in MindSpore 2.10, with Hugging Face names.

Architecture (Touvron et al., "LLaMA", 2023; identical maths to Hugging Face ``LlamaForCausalLM``,
``Qwen2ForCausalLM`` and ``MistralForCausalLM``): pre-norm blocks with RMSNorm (Zhang & Sennrich 2019,
computed in float32), rotary position embeddings (Su et al., "RoFormer", 2021, in Hugging Face's
rotate-half convention: the first and second halves of each head are the two coordinates of a pair),
grouped-query attention (Ainslie et al. 2023: ``num_key_value_heads`` heads of keys and values, each
shared by ``num_attention_heads / num_key_value_heads`` query heads), a SwiGLU MLP (Shazeer 2020:
``down(silu(gate(x)) * up(x))``), optional q/k/v biases (Qwen2) and a tied or untied output head.
Mistral's sliding window (a query sees at most ``sliding_window`` positions back) is applied when the
config sets it; ``rope_scaling`` and Qwen2's per-layer sliding windows are refused, not approximated.

Parameter names follow Hugging Face exactly (Linear weights stored [out, in], as ``ops.dense`` and
Hugging Face both store them)::

    model.embed_tokens.weight                              [vocab, hidden]
    model.layers.{i}.input_layernorm.weight                [hidden]
    model.layers.{i}.self_attn.{q,k,v,o}_proj.weight (+ .bias for q, k, v in Qwen2)
    model.layers.{i}.post_attention_layernorm.weight
    model.layers.{i}.mlp.{gate,up,down}_proj.weight
    model.norm.weight
    lm_head.weight                                          (absent when tied to embed_tokens)

API (the same as ``finetune.models.gpt2.GPT2LMHeadModel``)::

    model = LlamaForCausalLM(LlamaConfig.preset("llama-tiny"), seed=0)
    logits = model(input_ids, attention_mask)        # [B, T] int32, [B, T] float32 -> [B, T, V]
    losses = model.loss(input_ids, attention_mask)   # [B] per-example mean next-token NLL

Positions are 0..T-1 derived from the (batched) token ids, so ``ops.vmap`` sees a batched gather.

Book-keeping (``finetune.dp.per_example.taps`` documents the protocol): every linear projection
(q/k/v/o, gate/up/down, an untied ``lm_head``, LoRA or Houlsby-adapted ones included) and every
RMSNorm is a tap; ``taps()`` lists them in probe order (per layer: input_layernorm, q, k, v, o,
post_attention_layernorm, gate, up, down; then ``model.norm`` and an untied ``lm_head``).  With
``probes`` the forward adds probe k to tap k's output and also returns every tap's input (the
normalised input for an RMSNorm).  ``embeddings()`` gives ``(embed_tokens.weight, None)`` (rotary
positions have no table) and ``ties_embedding()`` whether it is also the head (Qwen2-style tie).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields

import numpy as np

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from .gpt2 import (_NEG, Embedding, Linear, TappedCausalLM, _masked_nll, _param, refresh_parameter_names,
                   run_tap)

__all__ = ["LlamaConfig", "LlamaForCausalLM", "MODEL_TYPES"]

MODEL_TYPES = ("llama", "qwen2", "mistral")


@dataclass(frozen=True)
class LlamaConfig:
    """Shape of a Llama-family decoder. Field names follow Hugging Face ``config.json``.

    ``qkv_bias`` / ``o_bias`` are derived from the family: Llama's ``attention_bias`` puts a bias on
    all four projections, Qwen2 has biases on q, k and v only, Mistral on none.

    Presets: ``llama-tiny`` (2 layers, width 64, 4 query / 2 key-value heads, untied head; for tests),
    ``llama-100m`` (12 layers, width 640, 10 / 5 heads, vocabulary 32000, untied: 95.6M parameters;
    for benchmarks).
    """

    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 0                    # 0: hidden_size // num_attention_heads (set on creation)
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int = 0              # 0: none
    initializer_range: float = 0.02

    def __post_init__(self):
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type {self.model_type!r} is not one of {MODEL_TYPES}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if not self.head_dim:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"hidden_size ({self.hidden_size}) is not divisible by num_attention_heads "
                                 f"({self.num_attention_heads}); give head_dim")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.dim_per_head % 2:
            raise ValueError(f"rotary embeddings need an even head dimension, got {self.dim_per_head}")
        if not (self.rope_theta > 0 and self.rms_norm_eps > 0):
            raise ValueError("rope_theta and rms_norm_eps must be positive")

    @property
    def dim_per_head(self) -> int:
        return self.head_dim

    @classmethod
    def preset(cls, name: str) -> "LlamaConfig":
        presets = {
            "llama-tiny": dict(vocab_size=5000, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256),
            "llama-100m": dict(vocab_size=32000, hidden_size=640, intermediate_size=1728,
                               num_hidden_layers=12, num_attention_heads=10, num_key_value_heads=5,
                               max_position_embeddings=1024),
        }
        if name not in presets:
            raise ValueError(f"unknown Llama preset {name!r}; choose one of {sorted(presets)}")
        return cls(**presets[name])

    @classmethod
    def from_dict(cls, d: dict) -> "LlamaConfig":
        """Read a Hugging Face ``config.json`` dict of a Llama, Qwen2 or Mistral checkpoint."""
        mt = d.get("model_type")
        if mt not in MODEL_TYPES:
            raise ValueError(f"config.json has model_type {mt!r}; this decoder reads {MODEL_TYPES}")
        if d.get("rope_scaling") not in (None, {}):
            raise ValueError(f"config.json sets rope_scaling {d['rope_scaling']!r}, which this decoder does "
                             "not implement (its logits would differ from the original model)")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"config.json has hidden_act {act!r}; only 'silu' (SwiGLU) is implemented")
        if mt == "qwen2" and d.get("use_sliding_window"):
            raise ValueError("config.json sets use_sliding_window: Qwen2's per-layer sliding windows are "
                             "not implemented")
        names = {f.name for f in fields(cls)} - {"qkv_bias", "o_bias", "sliding_window", "head_dim"}
        kwargs = {k: d[k] for k in names if d.get(k) is not None}
        kwargs.setdefault("num_key_value_heads", kwargs.get("num_attention_heads", 32))
        if d.get("head_dim"):
            kwargs["head_dim"] = int(d["head_dim"])
        if mt == "llama":
            kwargs["qkv_bias"] = kwargs["o_bias"] = bool(d.get("attention_bias", False))
        elif mt == "qwen2":
            kwargs["qkv_bias"], kwargs["o_bias"] = True, False
        if mt == "mistral" and d.get("sliding_window"):
            kwargs["sliding_window"] = int(d["sliding_window"])
        return cls(**kwargs)

    def to_dict(self) -> dict:
        d = asdict(self)
        qkv, o, window = d.pop("qkv_bias"), d.pop("o_bias"), d.pop("sliding_window")
        d.update(hidden_act="silu", rope_scaling=None,
                 architectures=[{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                                 "mistral": "MistralForCausalLM"}[self.model_type]])
        if self.model_type == "llama":
            if qkv != o:
                raise ValueError("a Llama config has one attention_bias for all four projections")
            d["attention_bias"] = qkv
        elif self.model_type == "mistral":
            d["sliding_window"] = window or None
        return d

    @classmethod
    def from_json(cls, path) -> "LlamaConfig":
        with open(path, encoding="utf-8") as f:
            try:
                return cls.from_dict(json.load(f))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from None

    def to_json(self, path) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")


class RMSNorm(nn.Cell):
    """x / sqrt(mean(x^2) + eps) * g over the last axis (Zhang & Sennrich 2019); a book-keeping tap."""

    n_taps = 1

    def __init__(self, n: int, eps: float):
        super().__init__()
        self.n_out = n
        self.eps = eps
        self.weight = _param(np.ones(n), "weight")

    def normalise(self, x):
        return x * ops.rsqrt((x * x).mean(-1, keep_dims=True) + self.eps)

    def construct(self, x, probe=None):
        if probe is None:
            return self.normalise(x) * self.weight
        return self.normalise(x) * self.weight + probe

    def saved(self, x):
        """What book-keeping needs to turn an output gradient into the gain's gradient."""
        return self.normalise(x)

    def taps(self):
        return (self,)


def _rotate_half(x):
    half = x.shape[-1] // 2
    return ops.concat((-x[..., half:], x[..., :half]), -1)


class Attention(nn.Cell):
    def __init__(self, cfg: LlamaConfig, rng: np.random.Generator):
        super().__init__()
        d, hd = cfg.hidden_size, cfg.dim_per_head
        self.n_head, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, hd
        self.scale = 1.0 / math.sqrt(hd)
        std = cfg.initializer_range
        self.q_proj = Linear(d, self.n_head * hd, rng, std, cfg.qkv_bias)
        self.k_proj = Linear(d, self.n_kv * hd, rng, std, cfg.qkv_bias)
        self.v_proj = Linear(d, self.n_kv * hd, rng, std, cfg.qkv_bias)
        self.o_proj = Linear(self.n_head * hd, d, rng, std, cfg.o_bias)

    def _heads(self, x, n):
        b, t, _ = x.shape
        return ops.transpose(ops.reshape(x, (b, t, n, self.head_dim)), (0, 2, 1, 3))     # [B, n, T, hd]

    def _repeat_kv(self, x):
        """Key-value head j serves query heads j*r .. j*r+r-1 (Hugging Face ``repeat_kv``)."""
        rep = self.n_head // self.n_kv
        if rep == 1:
            return x
        b, n, t, hd = x.shape
        x = ops.broadcast_to(ops.expand_dims(x, 2), (b, n, rep, t, hd))
        return ops.reshape(x, (b, n * rep, t, hd))

    def attend(self, q, k, v, cos, sin, bias):
        """Projected q, k, v [B, T, heads * hd] -> attention output [B, T, n_head * hd]."""
        b, t, _ = q.shape
        q, k, v = self._heads(q, self.n_head), self._heads(k, self.n_kv), self._heads(v, self.n_kv)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        k, v = self._repeat_kv(k), self._repeat_kv(v)
        scores = ops.matmul(q, ops.transpose(k, (0, 1, 3, 2))) * self.scale + bias
        out = ops.matmul(ops.softmax(scores, -1), v)
        return ops.reshape(ops.transpose(out, (0, 2, 1, 3)), (b, t, self.n_head * self.head_dim))

    def construct(self, x, cos, sin, bias):
        return self.o_proj(self.attend(self.q_proj(x), self.k_proj(x), self.v_proj(x), cos, sin, bias))


class MLP(nn.Cell):
    def __init__(self, cfg: LlamaConfig, rng: np.random.Generator):
        super().__init__()
        d, i, std = cfg.hidden_size, cfg.intermediate_size, cfg.initializer_range
        self.gate_proj = Linear(d, i, rng, std, cfg.mlp_bias)
        self.up_proj = Linear(d, i, rng, std, cfg.mlp_bias)
        self.down_proj = Linear(i, d, rng, std, cfg.mlp_bias)

    def construct(self, x):
        gate = self.gate_proj(x)
        return self.down_proj(gate * ops.sigmoid(gate) * self.up_proj(x))


class DecoderLayer(nn.Cell):
    def __init__(self, cfg: LlamaConfig, rng: np.random.Generator):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, rng)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, rng)

    def construct(self, x, cos, sin, bias):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, bias)
        return x + self.mlp(self.post_attention_layernorm(x))

    def taps(self):
        a, m = self.self_attn, self.mlp
        layers = (self.input_layernorm, a.q_proj, a.k_proj, a.v_proj, a.o_proj,
                  self.post_attention_layernorm, m.gate_proj, m.up_proj, m.down_proj)
        return tuple(t for layer in layers for t in layer.taps())

    def tap_count(self) -> int:
        a, m = self.self_attn, self.mlp
        return (self.input_layernorm.n_taps + a.q_proj.n_taps + a.k_proj.n_taps + a.v_proj.n_taps
                + a.o_proj.n_taps + self.post_attention_layernorm.n_taps + m.gate_proj.n_taps
                + m.up_proj.n_taps + m.down_proj.n_taps)

    def tapped(self, x, cos, sin, bias, p, i):
        """Same as construct, with probes p[i], p[i + 1], ... added at the taps; returns (x, saved,
        index of the next probe)."""
        a, m = self.self_attn, self.mlp
        h, s, i = run_tap(self.input_layernorm, x, p, i)
        q, sq, i = run_tap(a.q_proj, h, p, i)
        k, sk, i = run_tap(a.k_proj, h, p, i)
        v, sv, i = run_tap(a.v_proj, h, p, i)
        z, so, i = run_tap(a.o_proj, a.attend(q, k, v, cos, sin, bias), p, i)
        x = x + z
        h, s2, i = run_tap(self.post_attention_layernorm, x, p, i)
        gate, sg, i = run_tap(m.gate_proj, h, p, i)
        up, su, i = run_tap(m.up_proj, h, p, i)
        z, sd, i = run_tap(m.down_proj, gate * ops.sigmoid(gate) * up, p, i)
        return x + z, s + sq + sk + sv + so + s2 + sg + su + sd, i


def rotary_tables(cfg: LlamaConfig) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin [max_position_embeddings, head_dim] of RoFormer's rotation, Hugging Face layout:
    frequency ``theta^(-2j/hd)`` for j < hd/2, repeated for the second half (computed in float64)."""
    hd = cfg.dim_per_head
    inv_freq = cfg.rope_theta ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)
    angles = np.outer(np.arange(cfg.max_position_embeddings, dtype=np.float64), inv_freq)
    angles = np.concatenate([angles, angles], axis=-1)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


class LlamaModel(nn.Cell):
    """The decoder trunk (Hugging Face ``LlamaModel``), named ``model`` in the LM model."""

    def __init__(self, cfg: LlamaConfig, rng: np.random.Generator):
        super().__init__()
        self.config = cfg
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, rng, cfg.initializer_range)
        self.layers = nn.CellList([DecoderLayer(cfg, rng) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        cos, sin = rotary_tables(cfg)
        self._cos, self._sin = Tensor(cos), Tensor(sin)

    def _rope_and_bias(self, input_ids, attention_mask):
        pos = ops.cumsum(input_ids * 0 + 1, -1) - 1                              # [B, T]
        cos = ops.expand_dims(ops.gather(self._cos, pos, 0), 1)                  # [B, 1, T, hd]
        sin = ops.expand_dims(ops.gather(self._sin, pos, 0), 1)
        diff = ops.expand_dims(pos, -1) - ops.expand_dims(pos, -2)              # query - key
        keep = ops.logical_and(diff >= 0, ops.expand_dims(attention_mask, -2) > 0.5)
        if self.config.sliding_window:
            keep = ops.logical_and(keep, diff < self.config.sliding_window)
        bias = ops.expand_dims((1.0 - keep.astype(ms.float32)) * _NEG, 1)      # [B, 1, T, T]
        return cos, sin, bias

    def construct(self, input_ids, attention_mask):
        x = self.embed_tokens(input_ids)
        cos, sin, bias = self._rope_and_bias(input_ids, attention_mask)
        for layer in self.layers:
            x = layer(x, cos, sin, bias)
        return self.norm(x)

    def taps(self):
        out = ()
        for layer in self.layers:
            out = out + layer.taps()
        return out + self.norm.taps()

    def tapped(self, input_ids, attention_mask, probes, embedding_probe=None):
        """The trunk with probes added at its taps (and ``embedding_probe`` on the input
        embedding); returns (h, saved, index of the next probe)."""
        x = self.embed_tokens(input_ids)
        if embedding_probe is not None:
            x = x + embedding_probe
        cos, sin, bias = self._rope_and_bias(input_ids, attention_mask)
        saved = ()
        i = 0
        for layer in self.layers:
            x, s, i = layer.tapped(x, cos, sin, bias, probes, i)
            saved = saved + s
        h, s, i = run_tap(self.norm, x, probes, i)
        return h, saved + s, i


class LlamaForCausalLM(TappedCausalLM):
    """Llama / Qwen2 / Mistral decoder with its language-model head (tied or not)."""

    def __init__(self, config: LlamaConfig, seed: int = 0):
        super().__init__()
        if not isinstance(config, LlamaConfig):
            raise TypeError("config must be a LlamaConfig (use LlamaConfig.preset('llama-tiny'))")
        self.config = config
        rng = np.random.default_rng(seed)
        self.model = LlamaModel(config, rng)
        if not config.tie_word_embeddings:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, rng, config.initializer_range, bias=False)
        refresh_parameter_names(self)

    def head_weight(self) -> Parameter:
        return self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight

    def construct(self, input_ids, attention_mask, probes=None):
        return self.forward(input_ids, attention_mask, probes)

    def forward(self, input_ids, attention_mask, probes=None):
        """[B, T] ids (int32) and mask (float32, 1 = real token) -> logits [B, T, vocab]; with
        ``probes`` ``(logits, saved)`` (book-keeping hook, see module docstring)."""
        if probes is None:
            return ops.dense(self.model(input_ids, attention_mask), self.head_weight())
        n_taps = self.model.norm.n_taps
        if not self.config.tie_word_embeddings:
            n_taps = n_taps + self.lm_head.n_taps
        for layer in self.model.layers:
            n_taps = n_taps + layer.tap_count()
        embedding_probes = len(probes) > n_taps
        embedding_probe = probes[n_taps] if embedding_probes else None
        h, saved, i = self.model.tapped(input_ids, attention_mask, probes, embedding_probe)
        if self.config.tie_word_embeddings:
            logits = ops.dense(h, self.model.embed_tokens.weight)
            if embedding_probes:
                logits = logits + probes[n_taps + 1]
        else:
            logits, s, i = run_tap(self.lm_head, h, probes, i)
            saved = saved + s
        if embedding_probes:
            saved = saved + (input_ids, h)
        return logits, saved

    def loss(self, input_ids, attention_mask, probes=None):
        """Per-example mean next-token NLL (nats), shape [B]; padding masked (as GPT-2's).  With
        ``probes`` returns ``(losses, saved)``."""
        if probes is None:
            return _masked_nll(self.forward(input_ids, attention_mask), input_ids, attention_mask)
        logits, saved = self.forward(input_ids, attention_mask, probes)
        return _masked_nll(logits, input_ids, attention_mask), saved

    def loss_single(self, input_ids, attention_mask):
        """Loss of one example ([T] ids, [T] mask) -> scalar. Safe inside ``ops.vmap``."""
        return self.loss(ops.expand_dims(input_ids, 0), ops.expand_dims(attention_mask, 0))[0]

    # -- book-keeping (finetune.dp.per_example.taps) --------------------------------------------
    def taps(self):
        out = self.model.taps()
        return list(out if self.config.tie_word_embeddings else out + self.lm_head.taps())

    def embeddings(self):
        """(token embedding, None): rotary positions have no table."""
        return self.model.embed_tokens.weight, None

    def ties_embedding(self) -> bool:
        return bool(self.config.tie_word_embeddings)

    def embedding_probe_shapes(self, batch: int, seq: int):
        return [(batch, seq, self.config.hidden_size), (batch, seq, self.config.vocab_size)]
