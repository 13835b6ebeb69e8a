"""Writes tests/models/esm2_fixture.npz: a tiny random HF EsmModel's weights (HF names), a padded batch with
<mask> tokens, and the model's outputs (every layer and the last hidden state), computed by transformers.

    python tests/models/make_esm2_fixture.py        # needs torch and transformers

test_esm2.py also imports `tiny_esm` and `reference_outputs` from here for its live parity tests.
"""
from __future__ import annotations

import json
import os

import numpy as np

SEQUENCES = ["MKTAYIAKQRQISFVKSHFSRQ", "GS<mask>HMLV", "AC<mask><mask>DEFGHIKLmnZ", "W"]
HF_CONFIG = dict(vocab_size=33, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                 position_embedding_type="rotary", token_dropout=True, mask_token_id=32, pad_token_id=1,
                 max_position_embeddings=64, layer_norm_eps=1e-5, emb_layer_norm_before=False)


def tiny_esm(cls_name="EsmModel", seed=0, fp16_inv_freq=True, **overrides):
    """A random transformers ESM model (eval mode, eager attention). Every weight is redrawn so that LayerNorm
    scales and biases are not their trivial init; with `fp16_inv_freq` the stored RoPE frequencies are
    fp16-rounded, as in old ESM checkpoints, so a loader that recomputes them fails the comparison."""
    import torch
    import transformers
    torch.manual_seed(seed)
    cfg = transformers.EsmConfig(**{**HF_CONFIG, **overrides}, attn_implementation="eager")
    model = getattr(transformers, cls_name)(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("LayerNorm.weight") or "layer_norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0, 0.3 if p.ndim == 2 else 0.1)
        if fp16_inv_freq:
            base = model.esm if hasattr(model, "esm") else model
            base.rotary_embeddings.inv_freq.copy_(base.rotary_embeddings.inv_freq.half().float())
    return model


def reference_outputs(model, ids, mask) -> dict:
    """{'layers': (num_layers, B, L, d) each EsmLayer's output, 'last_hidden_state': (B, L, d)} from torch."""
    import torch
    base = model.esm if hasattr(model, "esm") else model
    layers = []
    hooks = [layer.register_forward_hook(lambda mod, inp, out: layers.append(out[0] if isinstance(out, tuple)
                                                                               else out))
             for layer in base.encoder.layer]
    try:
        with torch.no_grad():
            out = base(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long))
    finally:
        for h in hooks:
            h.remove()
    return {"layers": np.stack([t.numpy() for t in layers]), "last_hidden_state": out.last_hidden_state.numpy()}


def main(path=os.path.join(os.path.dirname(os.path.abspath(__file__)), "esm2_fixture.npz")):
    from jaxemb.data import proteins
    model = tiny_esm()
    toks = proteins.tokenize(SEQUENCES)
    ref = reference_outputs(model, toks.ids, toks.attention_mask)
    weights = {f"w:{k}": v.numpy() for k, v in model.state_dict().items()}
    np.savez_compressed(path, config=json.dumps({**HF_CONFIG, "model_type": "esm"}), ids=toks.ids,
                        attention_mask=toks.attention_mask, **ref, **weights)
    print(f"wrote {path} ({os.path.getsize(path)} bytes)")


if __name__ == "__main__":
    main()
