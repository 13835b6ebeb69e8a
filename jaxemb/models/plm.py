"""One handle on a protein LM backbone (ESM2 or a T5-family encoder) for the tasks that sit on top of it.

    bb, params = from_checkpoint("path/or/hub-name")   # Backbone(kind, cfg, vocab), params boxed
    h = hidden(bb.model(), unbox(params), tokens, segment_ids)     # (B, L, D) last hidden states

`from_checkpoint` reads config.json's model_type ("esm" -> jaxemb.models.esm2, "t5" -> jaxemb.models.t5
with the checkpoint's own tokenizer; `style` "prot_t5" or "ankh", "auto" = "ankh" when the name says so).
"""
from __future__ import annotations

import dataclasses
import json
import os

from jaxemb.data import ppi as data


@dataclasses.dataclass(frozen=True)
class Backbone:
    kind: str           # "esm2" or "t5"
    cfg: object         # Esm2Config or T5EncoderConfig
    vocab: data.Vocab   # how chains become ids

    @property
    def dim(self) -> int:
        return self.cfg.d_model

    def model(self):
        if self.kind == "esm2":
            from jaxemb.models.esm2 import esm2
            return esm2(self.cfg)
        from jaxemb.models.t5 import t5_encoder
        return t5_encoder(self.cfg)


def esm2_backbone(cfg) -> Backbone:
    return Backbone("esm2", cfg, data.ESM)


def hidden(model, params, tokens, segment_ids):
    """Last hidden states (B, L, D) of a backbone's encoder; segment ids 1, 2, ... per sequence packed in a
    row (0 = padding) keep attention inside each sequence (T5's relative positions are differences, so they
    are right in packed rows too)."""
    esm = hasattr(model.embed, "token_dropout")
    kw = {"pad_mask": segment_ids > 0} if esm else {"attention_mask": segment_ids > 0}
    _, h = model.apply({"params": params}, tokens, segment_ids, **kw)
    return h["final"]


def resolve(path: str) -> str:
    """A local checkpoint directory, downloading a hub name (org/model) through huggingface_hub first."""
    from jaxemb.models.esm2 import _download, _looks_like_hub_name
    from jaxemb.models.t5 import TOKENIZER_FILES
    if not os.path.isdir(path) and _looks_like_hub_name(path):
        path = _download(path, TOKENIZER_FILES)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: not a directory (expected a Hugging Face ESM2 / ProtT5 / Ankh "
                                "checkpoint directory or a hub name)")
    return path


def from_checkpoint(path: str, style: str = "auto", **overrides):
    """(Backbone, params boxed with logical axis names) from a HF checkpoint directory or hub name.
    `overrides` replace fields of the model config that do not change the weights (e.g. attention_chunk)."""
    path = resolve(path)
    cfg_file = os.path.join(path, "config.json")
    if not os.path.exists(cfg_file):
        raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face checkpoint directory)")
    with open(cfg_file) as f:
        kind = json.load(f).get("model_type")
    if kind == "esm":
        from jaxemb.models.esm2 import load_pretrained
        cfg, params = load_pretrained(path)
        return esm2_backbone(_override(cfg, overrides, cfg_file)), params
    if kind in ("t5", "mt5"):
        from jaxemb.models.t5 import T5Tokenizer, load_pretrained
        if style == "auto":
            style = "ankh" if "ankh" in os.path.abspath(path).lower() else "prot_t5"
        cfg, params = load_pretrained(path)
        return Backbone("t5", _override(cfg, overrides, cfg_file), data.t5_vocab(T5Tokenizer(path, style))), params
    raise ValueError(f"{cfg_file}: model_type={kind!r}; expected 'esm' (ESM2) or 't5' (ProtT5, Ankh)")


def _override(cfg, overrides: dict, where: str):
    fields = {f.name for f in dataclasses.fields(cfg)}
    bad = sorted(set(overrides) - fields)
    if bad:
        raise ValueError(f"{where}: {bad} are not fields of {type(cfg).__name__}; expected some of {sorted(fields)}")
    return dataclasses.replace(cfg, **overrides)
