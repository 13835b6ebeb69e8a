"""Multi-chain binding-affinity heads on protein-LM embeddings: EC, SC, HP and PAD, as ppiseq computes them.

Proteinea, "Beyond Simple Concatenation: Fairly Assessing PLM Architectures for Multi-Chain Protein-Protein
Interactions Prediction" (2025); PyTorch reference github.com/Proteinea/ppiseq. Every head pools with one
learned score per position (SimpleAttentionPooling, i.e. `jaxemb.kernels.attention_pool`) and regresses one
number. Inputs are per-residue embeddings (B, L, D) with valid-prefix lengths (B,):

- EC (embedding concatenation): concat_first (the paper's config) joins each row's real ligand and receptor
  positions into one sequence (no padding hole in between) and pools it, then Linear(D, D)-SiLU-Linear(D, 1);
  concat_first=False pools each side and concatenates (2D), then Linear(2D, 2D)-SiLU-Linear(2D, 1).
- SC (sequence concatenation): one sequence `<cls> L1 <eos> L2 <eos> ... R1 <eos> ...` through the encoder,
  pooled, Linear(D, 1).
- HP (hierarchical pooling): every chain encoded on its own and pooled (level 1); each side's chain vectors
  pooled again (level 2, a second pooler); the two sides concatenated (2D), Linear(2D, 2D)-SiLU-Linear(2D, 2D)
  without bias, Linear(2D, 1). The chains of a complex are laid out ligands first, then receptors, as
  (B, C, Lc, D) chain rows (`chain_lengths` (B, C), 0 for absent chains) or packed into one row per complex
  with segment ids (B, Lp) (1, 2, ... per chain, 0 = padding, as the encoder takes them); either way every
  chain of the batch is pooled in ONE kernel call, and level 2 is one more call with segment ids
  (ligand chains = segment 0, receptor chains = segment 1).
- PAD (pooled attention addition): one shared 8-head cross-attention without biases each way with residuals,
  X_L = E_L + MHA(E_L, E_R, E_R), X_R = E_R + MHA(E_R, E_L, E_L) (padded keys masked), both pooled and
  ADDED, Linear(D, D)-SiLU-Linear(D, D), Linear(D, 1).

With `convbert=True` one ConvBERT layer (jaxemb.nn.convbert, HF's ConvBertLayer; shared by both sides, as in
the paper) runs on the embeddings before pooling (the frozen-PLM setting); padding never leaks into its
convolution branch, and packed chains stay apart (segment ids), see jaxemb/nn/convbert.py. Poolers, ConvBERT and cross-attention are shared between the sides (the
paper's config). The last Linear is initialized U(-0.1, 0.1) with zero bias, every other Linear as PyTorch's
default (U(+-1/sqrt(fan_in)) for weight and bias), as the reference does.
"""
from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxemb.models import plm
from jaxemb.nn.pooling import SimpleAttentionPooling

HEADS = ("ec", "sc", "hp", "pad")


@dataclasses.dataclass(frozen=True)
class HeadConfig:
    kind: str = "hp"
    concat_first: bool = True      # EC only
    convbert: bool = False
    convbert_dropout: float = 0.2
    convbert_attn_dropout: float = 0.1
    cross_heads: int = 8           # PAD
    max_chains: int = 16           # HP with packed rows: chain slots per complex (static)
    implementation: str = "auto"   # the pooling kernel (jaxemb.kernels.attention_pool)
    interpret: bool = False

    def __post_init__(self):
        if self.kind not in HEADS:
            raise ValueError(f"head kind={self.kind!r}; expected one of {HEADS}")


class TorchDense(nn.Module):
    """Linear initialized as torch.nn.Linear: weight and bias U(+-1/sqrt(fan_in)); with `bound`, weight
    U(+-bound) and zero bias (the reference's output layer)."""
    features: int
    use_bias: bool = True
    bound: float | None = None

    @nn.compact
    def __call__(self, x):
        b = self.bound if self.bound is not None else 1.0 / math.sqrt(x.shape[-1])
        uniform = lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -b, b)
        y = x @ self.param("kernel", uniform, (x.shape[-1], self.features)).astype(x.dtype)
        if self.use_bias:
            bias_init = nn.initializers.zeros if self.bound is not None else uniform
            y = y + self.param("bias", bias_init, (self.features,)).astype(x.dtype)
        return y


def output_layer(name: str = "output"):
    return TorchDense(1, bound=0.1, name=name)


def prefix_mask(lengths, width: int):
    return jnp.arange(width)[None, :] < lengths[:, None]


def zero_padding(x, lengths):
    """x (B, L, D) with the positions at or beyond lengths (B,) set to 0, so that padding contents (NaN
    included) never reach a matmul where a zero attention weight would multiply them."""
    return jnp.where(prefix_mask(lengths, x.shape[1])[..., None], x, 0.0)


def join_sides(a, len_a, b, len_b):
    """Each row's real positions of a (B, La, D) followed by those of b (B, Lb, D), zero-padded to La + Lb:
    the concatenation a batch of one gives, without a padding hole in the middle. Returns (x, lengths)."""
    la_max, lb_max = a.shape[1], b.shape[1]
    pos = jnp.arange(la_max + lb_max)[None, :]
    la = len_a[:, None]
    src = jnp.clip(jnp.where(pos < la, pos, la_max + pos - la), 0, la_max + lb_max - 1)
    x = jnp.take_along_axis(jnp.concatenate([a, b], axis=1), src[..., None], axis=1)
    n = len_a + len_b
    return jnp.where(prefix_mask(n, la_max + lb_max)[..., None], x, 0.0), n


def side_segments(n_lig, n_rec, width: int):
    """(B, width) level-2 segment ids over a complex's chain slots: 0 for its ligand chains, 1 for its
    receptor chains, -1 for the empty slots after them."""
    c = jnp.arange(width)[None, :]
    return jnp.where(c < n_lig[:, None], 0, jnp.where(c < (n_lig + n_rec)[:, None], 1, -1)).astype(jnp.int32)


class _Base(nn.Module):
    cfg: HeadConfig

    def pooler(self, name):
        return SimpleAttentionPooling(implementation=self.cfg.implementation, interpret=self.cfg.interpret,
                                      name=name)

    def convbert(self):
        """(x, lengths, deterministic) -> x: the shared ConvBERT layer, identity without cfg.convbert; with
        segment_ids= instead of lengths, packed sequences stay apart in both of its branches."""
        c = self.cfg
        if not c.convbert:
            return lambda x, lengths=None, deterministic=True, segment_ids=None: x
        from jaxemb.nn.convbert import ConvBertLayer
        layer = ConvBertLayer(hidden_dropout=c.convbert_dropout, attention_dropout=c.convbert_attn_dropout,
                              name="convbert")

        def apply(x, lengths=None, deterministic=True, segment_ids=None):
            if segment_ids is not None:
                return layer(x, segment_ids=segment_ids, deterministic=deterministic)
            return layer(zero_padding(x, lengths), prefix_mask(lengths, x.shape[1]), deterministic=deterministic)
        return apply


class ECHead(_Base):
    """EC: lig (B, Ll, D), lig_len (B,), rec (B, Lr, D), rec_len (B,) -> (B,)."""

    @nn.compact
    def __call__(self, lig, lig_len, rec, rec_len, deterministic: bool = True):
        pool, conv = self.pooler("pool"), self.convbert()
        if self.cfg.concat_first:
            x, n = join_sides(lig, lig_len, rec, rec_len)
            h = pool(conv(x, n, deterministic), lengths=n)
        else:
            h = jnp.concatenate([pool(conv(lig, lig_len, deterministic), lengths=lig_len),
                                 pool(conv(rec, rec_len, deterministic), lengths=rec_len)], -1)
        h = nn.silu(TorchDense(h.shape[-1], name="hidden")(h))
        return output_layer()(h)[:, 0]


class SCHead(_Base):
    """SC: x (B, L, D) of the joined sequence, length (B,) -> (B,)."""

    @nn.compact
    def __call__(self, x, length, deterministic: bool = True):
        h = self.pooler("pool")(self.convbert()(x, length, deterministic), lengths=length)
        return output_layer()(h)[:, 0]


class PADHead(_Base):
    """PAD: lig (B, Ll, D), lig_len (B,), rec (B, Lr, D), rec_len (B,) -> (B,)."""

    @nn.compact
    def __call__(self, lig, lig_len, rec, rec_len, deterministic: bool = True):
        pool, conv = self.pooler("pool"), self.convbert()
        lig, rec = zero_padding(lig, lig_len), zero_padding(rec, rec_len)
        lig, rec = conv(lig, lig_len, deterministic), conv(rec, rec_len, deterministic)
        mha = nn.MultiHeadDotProductAttention(num_heads=self.cfg.cross_heads, use_bias=False, name="cross")
        ml, mr = prefix_mask(lig_len, lig.shape[1]), prefix_mask(rec_len, rec.shape[1])
        xl = lig + mha(lig, rec, rec, mask=mr[:, None, None, :])
        xr = rec + mha(rec, lig, lig, mask=ml[:, None, None, :])
        h = pool(xl, lengths=lig_len) + pool(xr, lengths=rec_len)
        d = h.shape[-1]
        h = TorchDense(d, name="ffn_out")(nn.silu(TorchDense(d, name="ffn_in")(h)))
        return output_layer()(h)[:, 0]


class HPHead(_Base):
    """HP: n_lig (B,), n_rec (B,) and either chains (B, C, Lc, D) with chain_len (B, C), or packed
    (B, Lp, D) with packed_seg (B, Lp) (1, 2, ... per chain, 0 = padding; at most cfg.max_chains) -> (B,)."""

    @nn.compact
    def __call__(self, n_lig, n_rec, chains=None, chain_len=None, packed=None, packed_seg=None,
                 deterministic: bool = True):
        if (chains is None) == (packed is None):
            raise ValueError("hp head: pass either chains + chain_len or packed + packed_seg")
        pool, chain_pool, conv = self.pooler("pool"), self.pooler("chain_pool"), self.convbert()
        if chains is not None:
            B, C, Lc, D = chains.shape
            rows, lens = chains.reshape(B * C, Lc, D), chain_len.reshape(B * C)
            vecs = pool(conv(rows, lens, deterministic), lengths=lens).reshape(B, C, D)
        else:
            packed = conv(packed, deterministic=deterministic, segment_ids=packed_seg)
            seg = (packed_seg - 1).astype(jnp.int32)          # kernel ids: 0, 1, ..; -1 = padding
            vecs = pool(packed, segment_ids=seg, num_segments=self.cfg.max_chains)   # (B, C, D)
        sides = chain_pool(vecs, segment_ids=side_segments(n_lig, n_rec, vecs.shape[1]), num_segments=2)
        h = sides.reshape(sides.shape[0], -1)                  # [ligand, receptor] (B, 2D)
        d = h.shape[-1]
        h = TorchDense(d, use_bias=False, name="ffn_out")(nn.silu(TorchDense(d, use_bias=False,
                                                                             name="ffn_in")(h)))
        return output_layer()(h)[:, 0]


def make_head(cfg: HeadConfig) -> nn.Module:
    return {"ec": ECHead, "sc": SCHead, "hp": HPHead, "pad": PADHead}[cfg.kind](cfg)


# ---------------------------------------------------------------- the task: a head on a frozen or trained PLM

MODES = ("frozen", "finetune")


def distinct_rows(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(table, inverse): the distinct rows of a token array and each row's index into them."""
    table, inverse = np.unique(tokens, axis=0, return_inverse=True)
    return table, inverse.reshape(-1).astype(np.int32)


def batch_arrays(lay: dict, kind: str, mode: str) -> tuple[dict, dict]:
    """(per-complex arrays for the batch source, token tables to embed once) for a head kind and mode, from
    jaxemb.data.ppi.layouts. Frozen: the batch holds row ids into the tables ('side': both sides' sequences,
    'sc', 'chain'); fine-tuning: the batch holds the tokens themselves and there are no tables."""
    if kind not in HEADS or mode not in MODES:
        raise ValueError(f"kind={kind!r}, mode={mode!r}; expected a kind in {HEADS} and a mode in {MODES}")
    arrays, tables = {}, {}
    if kind in ("ec", "pad"):
        arrays.update(lig_len=lay["lig_len"], rec_len=lay["rec_len"])
        if mode == "frozen":
            n = len(lay["lig"])
            table, inv = distinct_rows(np.concatenate([lay["lig"], lay["rec"]]))
            arrays.update(lig_row=inv[:n], rec_row=inv[n:])
            tables["side"] = table
        else:
            arrays.update(lig=lay["lig"], rec=lay["rec"])
    elif kind == "sc":
        arrays["sc_len"] = lay["sc_len"]
        if mode == "frozen":
            tables["sc"], arrays["sc_row"] = distinct_rows(lay["sc"])
        else:
            arrays["sc"] = lay["sc"]
    else:
        arrays.update(n_lig=lay["n_lig"], n_rec=lay["n_rec"])
        if mode == "frozen":
            arrays["chain_idx"] = lay["chain_idx"]
            tables["chain"] = lay["chain_tokens"]
        else:
            arrays.update(packed=lay["packed"], packed_seg=lay["packed_seg"])
    return arrays, tables


def bucket_spec(arrays: dict, kind: str, mode: str):
    """(arrays to cut along length, each row's length) for a length-bucketed source of batch_arrays(...), or
    None when the batch holds no tokens (frozen: row ids into the cached features)."""
    if mode == "frozen":
        return None
    if kind in ("ec", "pad"):  # both sides go through one encoder call, so they share one width
        return ("lig", "rec"), np.maximum(arrays["lig_len"], arrays["rec_len"])
    if kind == "sc":
        return ("sc",), arrays["sc_len"]
    return ("packed", "packed_seg"), (arrays["packed_seg"] > 0).sum(1)


def embed_tables(model, params, tables: dict, pad_id: int, batch_size: int = 64, dtype=np.float32,
                 progress=True) -> dict:
    """{name: (U, W, D) per-residue embeddings} of token tables (a backbone's ids, `pad_id` after each
    sequence), computed in jitted batches; plus {name + '_len': (U,)} lengths."""
    from tqdm.auto import tqdm
    fn = jax.jit(lambda p, t: plm.hidden(model, p, t, (t != pad_id).astype(jnp.int32)))
    out = {}
    for name, toks in tables.items():
        rows = []
        for i in tqdm(range(0, len(toks), batch_size), desc=f"embedding {name} ({len(toks)} sequences)",
                      disable=not progress, mininterval=1.0):
            chunk = toks[i:i + batch_size]
            full = np.concatenate([chunk, np.full((batch_size - len(chunk), chunk.shape[1]), pad_id, chunk.dtype)])
            rows.append(np.asarray(fn(params, full))[:len(chunk)].astype(dtype))
        out[name] = np.concatenate(rows)
        out[name + "_len"] = (toks != pad_id).sum(1).astype(np.int32)
    return out


class PPITask:
    """A head (HeadConfig) on a protein-LM backbone (jaxemb.models.plm.Backbone: ESM2 or T5), for the core.

    mode "frozen": the per-residue embeddings are Task constants (`features`, from embed_tables) and the
      batch holds row ids into them (batch_arrays): training costs only the head.
    mode "finetune": the encoder runs inside the loss on the batch's tokens; its params are params['encoder'],
      loaded from `encoder_path` (a save_tree directory) through Task.pretrained() when given.
    With `lora_rank` r > 0 (fine-tuning), the encoder stays frozen (Task.frozen) and low-rank updates
    W_q + (alpha / r) A_q B_q, W_v + (alpha / r) A_v B_v of every block's query and value projections are
    trained instead (LoRA; A kaiming-uniform, B zero, so training starts from the pretrained encoder).
    The loss is the mean squared error on targets standardized with `target_stats` = (mean, std) of the
    training split; `predict` returns target units. Batches also hold 'y' (N,) and 'weights'.
    """

    def __init__(self, head: HeadConfig, backbone: plm.Backbone, mode: str = "frozen", features: dict | None = None,
                 encoder_path: str | None = None, target_stats=(0.0, 1.0), tokens_per_example: int = 1,
                 lora_rank: int = 0, lora_alpha: float = 32.0):
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}; expected one of {MODES}")
        if (mode == "frozen") != (features is not None):
            raise ValueError("mode 'frozen' needs `features` (embed_tables); 'finetune' takes none")
        self.cfg, self.mode, self.backbone = head, mode, backbone
        self.head, self.encoder = make_head(head), backbone.model()
        self.mean, self.std = float(target_stats[0]), float(target_stats[1])
        if not self.std > 0:
            raise ValueError(f"target_stats={target_stats}; the std must be > 0")
        self.tokens_per_example = tokens_per_example
        if lora_rank < 0 or (lora_rank and mode != "finetune"):
            raise ValueError(f"lora_rank={lora_rank}; expected 0, or a positive rank with mode 'finetune'")
        self.lora_rank, self.lora_scale = int(lora_rank), float(lora_alpha) / max(1, lora_rank)
        if self.lora_rank:
            self.frozen = lambda path: path[0] == "encoder"
        if mode == "frozen":
            self._features = features
            self.constants = lambda: self._features
        elif encoder_path is not None:
            self.pretrained = lambda: {"encoder": encoder_path}

    def _inputs(self, params, batch, constants):
        k = self.cfg.kind
        prefix = lambda n, w: prefix_mask(n, w).astype(jnp.int32)
        if self.mode == "frozen":
            f = lambda name, rows: constants[name][rows].astype(jnp.float32)
            if k in ("ec", "pad"):
                return dict(lig=f("side", batch["lig_row"]), lig_len=batch["lig_len"],
                            rec=f("side", batch["rec_row"]), rec_len=batch["rec_len"])
            if k == "sc":
                return dict(x=f("sc", batch["sc_row"]), length=batch["sc_len"])
            idx = batch["chain_idx"]
            safe = jnp.maximum(idx, 0)
            return dict(chains=f("chain", safe), chain_len=jnp.where(idx >= 0, constants["chain_len"][safe], 0),
                        n_lig=batch["n_lig"], n_rec=batch["n_rec"])
        enc_params = self._merged(params) if self.lora_rank else params["encoder"]
        enc = lambda t, seg: plm.hidden(self.encoder, enc_params, t, seg)
        if k in ("ec", "pad"):
            n = batch["lig"].shape[0]
            both = jnp.concatenate([batch["lig"], batch["rec"]])         # one encoder call for both sides
            lens = jnp.concatenate([batch["lig_len"], batch["rec_len"]])
            h = enc(both, prefix(lens, both.shape[1]))
            return dict(lig=h[:n], lig_len=batch["lig_len"], rec=h[n:], rec_len=batch["rec_len"])
        if k == "sc":
            return dict(x=enc(batch["sc"], prefix(batch["sc_len"], batch["sc"].shape[1])), length=batch["sc_len"])
        return dict(packed=enc(batch["packed"], batch["packed_seg"]), packed_seg=batch["packed_seg"],
                    n_lig=batch["n_lig"], n_rec=batch["n_rec"])

    def init(self, rng, batch):
        k_enc, k_head = jax.random.split(rng)
        params, consts = {}, None
        if self.mode == "finetune":
            tokens = next(batch[n] for n in ("lig", "sc", "packed") if n in batch)
            params["encoder"] = self.encoder.init(k_enc, jnp.asarray(tokens[:1]))["params"]
            enc = jax.tree.map(lambda x: getattr(x, "value", x), params["encoder"],
                               is_leaf=lambda x: isinstance(x, nn.Partitioned))
            if self.lora_rank:
                params["lora"] = self._lora_init(jax.random.fold_in(k_enc, 1), enc)
            inputs = self._inputs({"encoder": enc, "lora": params.get("lora")}, batch, None)
        else:
            consts = jax.tree.map(jnp.asarray, self._features)
            inputs = self._inputs(None, batch, consts)
        params["head"] = self.head.init(k_head, **inputs)["params"]
        return params

    def _lora_init(self, rng, enc):
        r, out = self.lora_rank, {}
        for i, name in enumerate(sorted(n for n in enc if "attn" in enc[n])):
            d, _, h, k = enc[name]["attn"]["qkv"]["kernel"].shape
            bound = 1.0 / math.sqrt(d)  # kaiming-uniform with a = sqrt(5), as PEFT
            ka, kb = jax.random.split(jax.random.fold_in(rng, i))
            out[name] = {"q_a": jax.random.uniform(ka, (d, r), jnp.float32, -bound, bound),
                         "v_a": jax.random.uniform(kb, (d, r), jnp.float32, -bound, bound),
                         "q_b": jnp.zeros((r, h * k)), "v_b": jnp.zeros((r, h * k))}
        return out

    def _merged(self, params):
        """The encoder params with each block's LoRA updates added to its query and value kernels."""
        enc = dict(params["encoder"])
        for name, l in params["lora"].items():
            kernel = jnp.asarray(enc[name]["attn"]["qkv"]["kernel"])
            d, _, h, k = kernel.shape
            delta = lambda a, b: (self.lora_scale * (a @ b)).reshape(d, h, k).astype(kernel.dtype)
            kernel = kernel.at[:, 0].add(delta(l["q_a"], l["q_b"])).at[:, 2].add(delta(l["v_a"], l["v_b"]))
            attn = dict(enc[name]["attn"], qkv=dict(enc[name]["attn"]["qkv"], kernel=kernel))
            enc[name] = dict(enc[name], attn=attn)
        return enc

    def standardized(self, params, batch, rng=None, constants=None):
        """(B,) predictions in standardized units; dropout on when rng is given."""
        inputs = self._inputs(params, batch, constants)
        kw = {"rngs": {"dropout": rng}} if rng is not None and self.cfg.convbert else {}
        return self.head.apply({"params": params["head"]}, **inputs, deterministic=rng is None, **kw)

    def _sq_err(self, params, batch, rng, constants):
        z = self.standardized(params, batch, rng, constants)
        t = (batch["y"].astype(jnp.float32) - self.mean) / self.std
        w = batch["weights"].astype(jnp.float32)
        return jnp.sum(w * (z - t) ** 2), jnp.sum(w)

    def loss(self, params, batch, rng, constants=None):
        se, n = self._sq_err(params, batch, rng, constants)
        return se / jnp.maximum(n, 1.0), {}

    def eval_step(self, params, batch, rng, constants=None):
        return {"loss": self._sq_err(params, batch, None, constants)}

    def predict(self, params, batch, rng=None, constants=None):
        """(B,) predictions in target units (deterministic): for Trainer.map_batches."""
        return self.standardized(params, batch, None, constants) * self.std + self.mean
