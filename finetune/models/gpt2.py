"""A small, clean GPT-2 in MindSpore 2.10 with Hugging Face parameter names.

Why this exists: ``mindformers`` (the MindSpore model zoo) cannot be installed next to MindSpore
2.10 (2.x needs MindSpore 2.11 and unpublished packages; 1.3.2, the last release with GPT-2, fails
on import), and ``mindnlp`` 0.5.1 fails on import too. So this module is a from-scratch GPT-2
(Radford et al., "Language Models are Unsupervised Multitask Learners", 2019) written for the two
things DP fine-tuning needs: exact per-example gradients under ``ops.vmap(ms.grad(...))`` and fast
graph-mode (``ms.jit``) training steps on CPU.

Architecture (identical maths to Hugging Face ``GPT2LMHeadModel``): pre-LayerNorm transformer
blocks, learned absolute positions, causal self-attention, GELU with the tanh approximation
("gelu_new"), final LayerNorm, and a language-model head tied to the token embedding.

Parameter names follow the Hugging Face layout exactly::

    transformer.wte.weight                [vocab, n_embd]
    transformer.wpe.weight                [n_positions, n_embd]
    transformer.h.{i}.ln_1.weight / .bias
    transformer.h.{i}.attn.c_attn.weight / .bias     weight stored [out, in] = [3*n_embd, n_embd]
    transformer.h.{i}.attn.c_proj.weight / .bias     [n_embd, n_embd]
    transformer.h.{i}.ln_2.weight / .bias
    transformer.h.{i}.mlp.c_fc.weight / .bias        [4*n_embd, n_embd]
    transformer.h.{i}.mlp.c_proj.weight / .bias      [n_embd, 4*n_embd]
    transformer.ln_f.weight / .bias
    (lm_head.weight is tied to transformer.wte.weight and is not a separate parameter)

Dense weights are stored [out, in] because ``ops.dense(x, W, b)`` with that layout is ~5x faster
on CPU than a 3-D matmul. Hugging Face ``Conv1D`` stores [in, out]; ``finetune.models.checkpoint``
transposes when it reads or writes Hugging Face files.

API for training code (the DP optimizer builds on exactly this)::

    from finetune.models.gpt2 import GPT2Config, GPT2LMHeadModel
    model = GPT2LMHeadModel(GPT2Config.tiny(), seed=0)
    logits = model(input_ids, attention_mask)                 # [B, T] int32, [B, T] float32 -> [B, T, V]
    losses = model.loss(input_ids, attention_mask)            # [B] per-example mean token NLL
    loss_1 = model.loss_single(input_ids[0], attention_mask[0])  # one example, [T] -> scalar

    # exact per-example gradients (graph mode works too: wrap in ms.jit)
    params = ms.ParameterTuple(model.trainable_params())
    grad_1 = ms.grad(model.loss_single, grad_position=None, weights=params)
    per_example = ops.vmap(grad_1, in_axes=(0, 0))(input_ids, attention_mask)  # tuple of [B, *p.shape]

``token_nll(model, input_ids, attention_mask)`` is the same per-example loss as a free function.
Padding is masked: a target token counts when both it and the token predicting it have mask 1.
Positions are derived from the (batched) token ids, never from a constant, because MindSpore's
vmap fails on a gather whose inputs are all unbatched.

Book-keeping ("ghost norm") hook: every ``Linear`` and ``LayerNorm`` is a *tap*. Passing
``probes`` (a tuple, one zero tensor per tap, shaped like that tap's output, in the order of
``model.tap_names()``; ``model.probe_shapes(B, T)`` gives the shapes) adds each probe to its tap's
output and additionally returns the tap inputs (Linear: its input activation x; LayerNorm: the
normalised input x_hat). The gradient of the summed loss w.r.t. the probes is each example's output
gradient g, from which per-example weight gradients are sum_t g_t x_t^T and bias gradients sum_t g_t.
A probe may also be constant over the tokens, shaped [B, 1, d] (its gradient is then each example's
bias gradient sum_t g_t, all BiTFiT needs) or [1, 1, 1] (a tap with nothing trained); such a probe
is added to the bias vector before the broadcast, so the tapped forward allocates nothing the plain
one does not::

    logits, saved = model(input_ids, attention_mask, probes)
    losses, saved = model.loss(input_ids, attention_mask, probes)

A Houlsby-adapted projection (``finetune.models.peft.AdaptedLinear``) holds three taps (``n_taps``):
the projection, the adapter's ``down`` and ``up``; ``run_tap`` runs any layer with its probes. The
protocol is documented in ``finetune.dp.per_example.taps``.

Generation for evaluation: ``generate(model, prompts, max_new_tokens, top_k=0)`` (greedy when
``top_k`` is 0, otherwise top-k sampling with a seeded generator).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields

import numpy as np

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

__all__ = [
    "GPT2Config",
    "Linear",
    "LayerNorm",
    "Embedding",
    "GPT2Model",
    "GPT2LMHeadModel",
    "token_nll",
    "generate",
    "refresh_parameter_names",
    "assign_parameter",
]

_NEG = -1e9  # additive mask value: finite, so a fully masked row gives a uniform softmax, not NaN


@dataclass(frozen=True)
class GPT2Config:
    """Shape of a GPT-2. Field names follow Hugging Face ``config.json``.

    Presets:
      * ``tiny()``: 2 layers, width 128, 2 heads, 256 positions, vocabulary 5000. The vocabulary is
        the real GPT-2 byte-level BPE cut to its first 4743 merges (ids 0..4998 are *the same ids*
        as full GPT-2, lossless on any text; ``<|endoftext|>`` becomes id 4999). See
        ``finetune.models.tokenizer.load_tokenizer(vocab_size=5000)``. Cutting merges, not remapping ids,
        keeps every id meaningful and makes the 50k-row embedding/head 10x smaller for tests and
        benchmarks.
      * ``small()``: GPT-2 small, 124M parameters (12 x 768, 12 heads, 1024 positions, 50257 ids).
    """

    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    vocab_size: int = 50257
    n_positions: int = 1024
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02

    def __post_init__(self):
        for name in ("n_layer", "n_head", "n_embd", "vocab_size", "n_positions"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"GPT2Config.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")

    @classmethod
    def tiny(cls) -> "GPT2Config":
        return cls(n_layer=2, n_head=2, n_embd=128, vocab_size=5000, n_positions=256)

    @classmethod
    def small(cls) -> "GPT2Config":
        return cls()

    @classmethod
    def preset(cls, name: str) -> "GPT2Config":
        presets = {"tiny": cls.tiny, "small": cls.small}
        if name not in presets:
            raise ValueError(f"unknown GPT-2 preset {name!r}; choose one of {sorted(presets)}")
        return presets[name]()

    @classmethod
    def from_dict(cls, d: dict) -> "GPT2Config":
        """Read a Hugging Face GPT-2 ``config.json`` dict (unknown keys are ignored)."""
        mt = d.get("model_type", "gpt2")
        if mt != "gpt2":
            raise ValueError(f"config.json has model_type {mt!r}; only 'gpt2' is supported")
        names = {f.name for f in fields(cls)}
        kwargs = {k: d[k] for k in names if k in d}
        # very old configs use n_ctx for the context length
        if "n_positions" not in kwargs and "n_ctx" in d:
            kwargs["n_positions"] = d["n_ctx"]
        return cls(**kwargs)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(model_type="gpt2", architectures=["GPT2LMHeadModel"], n_ctx=self.n_positions,
                 activation_function="gelu_new", tie_word_embeddings=True)
        return d

    @classmethod
    def from_json(cls, path) -> "GPT2Config":
        with open(path, encoding="utf-8") as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(d)

    def to_json(self, path) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")


def _param(array: np.ndarray, name: str, requires_grad: bool = True) -> Parameter:
    return Parameter(Tensor(np.ascontiguousarray(array, dtype=np.float32)), name=name,
                     requires_grad=requires_grad)


def _per_example(probe) -> bool:
    """A probe of shape [B, 1, d] (or [1, 1, 1]) is constant over the tokens: its gradient is each
    example's summed output gradient, all a bias needs.  It is added to the bias vector, before the
    broadcast, so that the tapped forward allocates no tensor of the output's size that the plain
    forward does not (measured: 3.3 GB at GPT-2 small, batch 16, sequence 128, for BiTFiT)."""
    return probe.shape[-2] == 1


class Linear(nn.Cell):
    """y = x W^T (+ b) with W stored [out, in] (``ops.dense``); a book-keeping tap.  GPT-2's layers all
    have a bias; ``bias=False`` gives the bias-free projections of Llama-family models."""

    n_taps = 1  # book-keeping taps this layer holds (see ``run_tap``)

    def __init__(self, n_in: int, n_out: int, rng: np.random.Generator, std: float, bias: bool = True):
        super().__init__()
        self.n_in, self.n_out = n_in, n_out
        self.weight = _param(rng.normal(0.0, std, (n_out, n_in)), "weight")
        self.bias = _param(np.zeros(n_out), "bias") if bias else None

    def construct(self, x, probe=None):
        if probe is None:
            return ops.dense(x, self.weight, self.bias)
        if self.bias is None:
            return ops.dense(x, self.weight) + probe
        if _per_example(probe):
            return ops.dense(x, self.weight) + (self.bias + probe)
        return ops.dense(x, self.weight, self.bias) + probe

    def saved(self, x):
        """What book-keeping needs to turn an output gradient into parameter gradients."""
        return x

    def taps(self):
        return (self,)


class LayerNorm(nn.Cell):
    """LayerNorm over the last axis (Ba et al. 2016), written out so vmap and grad see plain ops."""

    n_taps = 1

    def __init__(self, n: int, eps: float):
        super().__init__()
        self.n_out = n
        self.eps = eps
        self.weight = _param(np.ones(n), "weight")
        self.bias = _param(np.zeros(n), "bias")

    def normalise(self, x):
        mean = x.mean(-1, keep_dims=True)
        xc = x - mean
        var = (xc * xc).mean(-1, keep_dims=True)
        return xc * ops.rsqrt(var + self.eps)

    def construct(self, x, probe=None):
        if probe is None:
            return self.normalise(x) * self.weight + self.bias
        if _per_example(probe):
            return self.normalise(x) * self.weight + (self.bias + probe)
        return self.normalise(x) * self.weight + self.bias + probe

    def saved(self, x):
        return self.normalise(x)

    def taps(self):
        return (self,)


class Embedding(nn.Cell):
    def __init__(self, n: int, dim: int, rng: np.random.Generator, std: float):
        super().__init__()
        self.weight = _param(rng.normal(0.0, std, (n, dim)), "weight")

    def construct(self, ids):
        return ops.gather(self.weight, ids, 0)


def run_tap(layer, x, probes, i):
    """Run tap ``layer`` on ``x`` with its probes from ``probes[i]`` on: (output, saved inputs,
    index of the next probe).  A layer holding several taps (a Houlsby-adapted projection) has
    ``n_taps > 1`` and a ``tapped(x, probes)`` of its own."""
    if layer.n_taps == 1:
        return layer(x, probes[i]), (layer.saved(x),), i + 1
    y, saved = layer.tapped(x, probes[i:i + layer.n_taps])
    return y, saved, i + layer.n_taps


def _gelu_tanh(x):
    # GPT-2's "gelu_new": 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))  (Hendrycks & Gimpel 2016)
    return 0.5 * x * (1.0 + ops.tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))


class Attention(nn.Cell):
    def __init__(self, cfg: GPT2Config, rng: np.random.Generator):
        super().__init__()
        c = cfg.n_embd
        self.n_head = cfg.n_head
        self.head_dim = c // cfg.n_head
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.c_attn = Linear(c, 3 * c, rng, cfg.initializer_range)
        self.c_proj = Linear(c, c, rng, cfg.initializer_range / math.sqrt(2 * cfg.n_layer))

    def _heads(self, x, b, t):
        return ops.transpose(ops.reshape(x, (b, t, self.n_head, self.head_dim)), (0, 2, 1, 3))

    def attend(self, qkv, bias):
        b, t, c3 = qkv.shape
        c = c3 // 3
        q, k, v = ops.split(qkv, c, -1)
        q, k, v = self._heads(q, b, t), self._heads(k, b, t), self._heads(v, b, t)
        scores = ops.matmul(q, ops.transpose(k, (0, 1, 3, 2))) * self.scale + bias
        probs = ops.softmax(scores, -1)
        out = ops.matmul(probs, v)
        return ops.reshape(ops.transpose(out, (0, 2, 1, 3)), (b, t, c))


class MLP(nn.Cell):
    def __init__(self, cfg: GPT2Config, rng: np.random.Generator):
        super().__init__()
        c = cfg.n_embd
        self.c_fc = Linear(c, 4 * c, rng, cfg.initializer_range)
        self.c_proj = Linear(4 * c, c, rng, cfg.initializer_range / math.sqrt(2 * cfg.n_layer))


class Block(nn.Cell):
    def __init__(self, cfg: GPT2Config, rng: np.random.Generator):
        super().__init__()
        self.ln_1 = LayerNorm(cfg.n_embd, cfg.layer_norm_epsilon)
        self.attn = Attention(cfg, rng)
        self.ln_2 = LayerNorm(cfg.n_embd, cfg.layer_norm_epsilon)
        self.mlp = MLP(cfg, rng)

    def taps(self):
        layers = (self.ln_1, self.attn.c_attn, self.attn.c_proj, self.ln_2, self.mlp.c_fc, self.mlp.c_proj)
        return tuple(t for layer in layers for t in layer.taps())

    def tap_count(self) -> int:
        return (self.ln_1.n_taps + self.attn.c_attn.n_taps + self.attn.c_proj.n_taps + self.ln_2.n_taps
                + self.mlp.c_fc.n_taps + self.mlp.c_proj.n_taps)

    def construct(self, x, bias):
        h = self.ln_1(x)
        a = self.attn.c_proj(self.attn.attend(self.attn.c_attn(h), bias))
        x = x + a
        h = self.ln_2(x)
        m = self.mlp.c_proj(_gelu_tanh(self.mlp.c_fc(h)))
        return x + m

    def tapped(self, x, bias, p, i):
        """Same as construct, with probes p[i], p[i + 1], ... added at the taps; returns
        (x, saved, index of the next probe)."""
        h, s0, i = run_tap(self.ln_1, x, p, i)
        qkv, s1, i = run_tap(self.attn.c_attn, h, p, i)
        z, s2, i = run_tap(self.attn.c_proj, self.attn.attend(qkv, bias), p, i)
        x = x + z
        h, s3, i = run_tap(self.ln_2, x, p, i)
        z, s4, i = run_tap(self.mlp.c_fc, h, p, i)
        z, s5, i = run_tap(self.mlp.c_proj, _gelu_tanh(z), p, i)
        return x + z, s0 + s1 + s2 + s3 + s4 + s5, i


class GPT2Model(nn.Cell):
    """The transformer trunk (Hugging Face ``GPT2Model``), named ``transformer`` in the LM model."""

    def __init__(self, cfg: GPT2Config, rng: np.random.Generator):
        super().__init__()
        self.config = cfg
        self.wte = Embedding(cfg.vocab_size, cfg.n_embd, rng, cfg.initializer_range)
        self.wpe = Embedding(cfg.n_positions, cfg.n_embd, rng, cfg.initializer_range / 2)
        self.h = nn.CellList([Block(cfg, rng) for _ in range(cfg.n_layer)])
        self.ln_f = LayerNorm(cfg.n_embd, cfg.layer_norm_epsilon)

    def _embed_and_bias(self, input_ids, attention_mask):
        # Positions 0..T-1 computed from the (batched) ids so that vmap sees a batched gather.
        pos = ops.cumsum(input_ids * 0 + 1, -1) - 1
        x = self.wte(input_ids) + self.wpe(pos)
        # causal: key position <= query position; padding keys are masked too.
        causal = ops.expand_dims(pos, -1) >= ops.expand_dims(pos, -2)           # [B, T(q), T(k)]
        keep = ops.logical_and(causal, ops.expand_dims(attention_mask, -2) > 0.5)
        bias = (1.0 - keep.astype(ms.float32)) * _NEG
        return x, ops.expand_dims(bias, 1)                                      # [B, 1, T, T]

    def construct(self, input_ids, attention_mask):
        x, bias = self._embed_and_bias(input_ids, attention_mask)
        for block in self.h:
            x = block(x, bias)
        return self.ln_f(x)

    def tap_count(self) -> int:
        n = self.ln_f.n_taps
        for block in self.h:
            n = n + block.tap_count()
        return n

    def tapped(self, input_ids, attention_mask, probes):
        x, bias = self._embed_and_bias(input_ids, attention_mask)
        n_taps = self.tap_count()
        if len(probes) > n_taps:  # embedding probe (full fine-tuning): dL/dx0 = token and position grads
            x = x + probes[n_taps]
        saved = ()
        i = 0
        for block in self.h:
            x, s, i = block.tapped(x, bias, probes, i)
            saved = saved + s
        h, s_f, i = run_tap(self.ln_f, x, probes, i)
        return h, saved + s_f


class TappedCausalLM(nn.Cell):
    """What GPT-2 and the Llama family share as book-keeping models (the tap protocol of
    ``finetune.dp.per_example.taps``): subclasses give ``taps()``, the layers whose outputs take a
    probe, in probe order."""

    def tap_names(self):
        """Names (HF layout, e.g. 'transformer.h.0.attn.c_attn') of the taps, in probe order."""
        ids = {id(c): n for n, c in self.cells_and_names()}
        return [ids[id(c)] for c in self.taps()]

    def probe_shapes(self, batch: int, seq: int):
        return [(batch, seq, c.n_out) for c in self.taps()]

    def zero_probes(self, batch: int, seq: int):
        return tuple(ops.zeros(s, ms.float32) for s in self.probe_shapes(batch, seq))

    def num_parameters(self, trainable_only: bool = False) -> int:
        ps = self.trainable_params() if trainable_only else self.get_parameters()
        return int(sum(int(np.prod(p.shape)) for p in ps))


class GPT2LMHeadModel(TappedCausalLM):
    """GPT-2 with the tied language-model head. See the module docstring for the API."""

    def __init__(self, config: GPT2Config, seed: int = 0):
        super().__init__()
        if not isinstance(config, GPT2Config):
            raise TypeError("config must be a GPT2Config (use GPT2Config.tiny() / .small())")
        self.config = config
        self.transformer = GPT2Model(config, np.random.default_rng(seed))
        refresh_parameter_names(self)

    # -- forward ---------------------------------------------------------------------------
    def construct(self, input_ids, attention_mask, probes=None):
        return self.forward(input_ids, attention_mask, probes)

    def forward(self, input_ids, attention_mask, probes=None):
        """[B, T] ids (int32) and mask (float32, 1 = real token) -> logits [B, T, vocab].

        With ``probes`` returns ``(logits, saved)`` (book-keeping hook, see module docstring).
        """
        if probes is None:
            h = self.transformer(input_ids, attention_mask)
            return ops.dense(h, self.transformer.wte.weight)
        h, saved = self.transformer.tapped(input_ids, attention_mask, probes)
        logits = ops.dense(h, self.transformer.wte.weight)
        if len(probes) > self.transformer.tap_count():  # tied output projection probe
            logits = logits + probes[-1]
            saved = saved + (input_ids, h)
        return logits, saved

    def loss(self, input_ids, attention_mask, probes=None):
        """Per-example mean next-token NLL (nats), shape [B]; padding masked."""
        if probes is None:
            return _masked_nll(self.forward(input_ids, attention_mask), input_ids, attention_mask)
        logits, saved = self.forward(input_ids, attention_mask, probes)
        return _masked_nll(logits, input_ids, attention_mask), saved

    def loss_single(self, input_ids, attention_mask):
        """Loss of one example ([T] ids, [T] mask) -> scalar. Safe inside ``ops.vmap``."""
        ids = ops.expand_dims(input_ids, 0)
        mask = ops.expand_dims(attention_mask, 0)
        return self.loss(ids, mask)[0]

    # -- book-keeping helpers ----------------------------------------------------------------
    def taps(self):
        out = []
        for block in self.transformer.h:
            out.extend(block.taps())
        out.extend(self.transformer.ln_f.taps())
        return out

    def embeddings(self):
        """(token embedding, position embedding) Parameters; the token embedding is tied to the head.

        Book-keeping for them: pass ``len(taps()) + 2`` probes, the last two shaped
        ``embedding_probe_shapes(B, T)``: one on the summed input embedding x0 (its gradient g_e
        gives the lookup part of both embeddings' gradients) and one on the logits (its gradient
        g_o gives the tied head part ``g_o^T h``); ``saved`` then ends with ``(input_ids, h)``,
        ``h`` the head's input.
        """
        return self.transformer.wte.weight, self.transformer.wpe.weight

    def embedding_probe_shapes(self, batch: int, seq: int):
        return [(batch, seq, self.config.n_embd), (batch, seq, self.config.vocab_size)]



def _masked_nll(logits, input_ids, attention_mask):
    # Targets are the ids shifted left by one; the last position (and any position whose target or
    # input is padding) gets weight 0. Shifting the small [B, T] ids instead of slicing the
    # [B, T, V] logits avoids a copy of the largest tensor.
    target = ops.concat((input_ids[:, 1:], input_ids[:, :1]), 1)
    next_mask = ops.concat((attention_mask[:, 1:], attention_mask[:, :1] * 0.0), 1)
    tok_mask = attention_mask * next_mask
    logp = ops.log_softmax(logits, -1)
    nll = -ops.gather_elements(logp, -1, ops.expand_dims(target, -1)).squeeze(-1)
    count = ops.maximum(tok_mask.sum(-1), 1.0)
    return (nll * tok_mask).sum(-1) / count


def token_nll(model: GPT2LMHeadModel, input_ids, attention_mask):
    """Per-example mean token NLL [B] of ``model`` (padding masked). Same as ``model.loss``."""
    return model.loss(input_ids, attention_mask)


def assign_parameter(param: Parameter, value) -> None:
    """Overwrite ``param`` in place with ``value`` (same shape), cast to float32.

    In MindSpore 2.10 ``Parameter.set_data`` (and ``assign_value``) swap in a new tensor that graphs
    compiled *earlier* (``ms.jit``, graph-mode Cells) never see: they keep computing with the old
    weights. An in-place ``ops.assign`` is seen by every graph. All weight writes in ``finetune``
    (checkpoint and adapter loading, LoRA merge/unmerge) go through this function.
    """
    arr = np.ascontiguousarray(value.asnumpy() if isinstance(value, Tensor) else value, dtype=np.float32)
    if tuple(arr.shape) != tuple(param.shape):
        raise ValueError(f"{param.name}: cannot assign shape {tuple(arr.shape)} to {tuple(param.shape)}")
    ops.assign(param, Tensor(arr))


def refresh_parameter_names(cell: nn.Cell) -> None:
    """Set every Parameter's ``name`` to its attribute path (e.g. after swapping in a LoRA layer).

    MindSpore assigns names when a Cell is first attached; replacing a sub-cell later leaves the
    new parameters with short names, which would break checkpoints and name-pattern selection.
    """
    for name, p in cell.parameters_and_names():
        if p.name != name:
            p.name = name


# -- generation -----------------------------------------------------------------------------
def _graph_signature(model):
    """Python-level switches a compiled forward depends on (LoRA ``merged`` flags)."""
    return tuple((n, bool(c.merged)) for n, c in model.cells_and_names() if hasattr(c, "merged"))


def _forward_fn(model):
    """A compiled forward for ``model``, kept on the model and rebuilt when a graph-shaping switch
    (a LoRA merge) changed."""
    sig = _graph_signature(model)
    entry = model.__dict__.get("_generate_forward")
    if entry is None or entry[0] != sig:
        def forward(ids, mask):
            return model(ids, mask)
        entry = (sig, ms.jit(forward))
        object.__setattr__(model, "_generate_forward", entry)
    return entry[1]


def generate(model: GPT2LMHeadModel, prompts, max_new_tokens: int, top_k: int = 0,
             temperature: float = 1.0, seed: int = 0, eos_id: int | None = None,
             use_jit: bool = True):
    """Continue each prompt (list of token-id lists); greedy if ``top_k == 0`` else top-k sampling.

    All rows share one fixed [B, L] buffer (L = longest prompt + max_new_tokens), so the model is
    compiled once; causality makes the right padding invisible to earlier positions. Returns the
    generated continuations (without the prompts) as lists of ids, stopped at ``eos_id`` if given.
    """
    if max_new_tokens < 0:
        raise ValueError("max_new_tokens must be >= 0")
    if top_k < 0:
        raise ValueError("top_k must be >= 0")
    prompts = [list(p) for p in prompts]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    b = len(prompts)
    lengths = np.array([len(p) for p in prompts])
    total = int(lengths.max()) + max_new_tokens
    if total > model.config.n_positions:
        raise ValueError(f"prompt + max_new_tokens = {total} exceeds n_positions "
                         f"{model.config.n_positions}")
    buf = np.zeros((b, total), np.int32)
    for i, p in enumerate(prompts):
        buf[i, :len(p)] = p
    mask = np.ones((b, total), np.float32)
    rng = np.random.default_rng(seed)
    fwd = _forward_fn(model) if use_jit else model
    out = [[] for _ in range(b)]
    done = np.zeros(b, bool)
    cur = lengths.copy()
    for _ in range(max_new_tokens):
        logits = fwd(Tensor(buf), Tensor(mask)).asnumpy()
        nxt = logits[np.arange(b), cur - 1].astype(np.float64)
        if top_k == 0:
            tok = nxt.argmax(-1)
        else:
            k = min(top_k, nxt.shape[-1])
            tok = np.empty(b, np.int64)
            for i in range(b):
                idx = np.argpartition(-nxt[i], k - 1)[:k]
                z = nxt[i, idx] / max(temperature, 1e-8)
                pr = np.exp(z - z.max())
                tok[i] = idx[rng.choice(k, p=pr / pr.sum())]
        for i in range(b):
            if done[i]:
                continue
            buf[i, cur[i]] = tok[i]
            out[i].append(int(tok[i]))
            cur[i] += 1
            if eos_id is not None and tok[i] == eos_id:
                done[i] = True
        if done.all():
            break
    return out
