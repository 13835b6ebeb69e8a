"""Writes tests/models/t5_fixture.npz: two tiny random HF T5EncoderModels' weights (HF names; one ReLU, one
gated-GELU), a padded batch of mixed lengths, and each model's outputs (every block and the last hidden
state), computed by transformers.

    python tests/models/make_t5_fixture.py        # needs torch and transformers

test_t5.py also imports `tiny_t5`, `reference_outputs` and `batch` from here for its live parity tests.
"""
from __future__ import annotations

import json
import os

import numpy as np

HF_CONFIG = dict(vocab_size=40, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                 relative_attention_num_buckets=8, relative_attention_max_distance=12, layer_norm_epsilon=1e-6,
                 dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
PROJS = ("relu", "gated-gelu")
LENGTHS = (23, 7, 16, 1)  # with 23 tokens, distances reach past max_distance (the log buckets and the cap)


def tiny_t5(proj="relu", seed=0, **overrides):
    """A random transformers T5EncoderModel (eval mode, eager attention); every weight redrawn, layer norm
    scales away from 1."""
    import torch
    import transformers
    torch.manual_seed(seed)
    cfg = transformers.T5Config(**{**HF_CONFIG, "feed_forward_proj": proj, **overrides}, attn_implementation="eager")
    model = transformers.T5EncoderModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif "relative_attention_bias" in name:
                p.normal_(0, 1.0)
            else:
                p.normal_(0, 0.3)
    return model


def batch(seed=0, vocab=40):
    """(ids, attention_mask): random non-special ids (3..vocab-1), </s> (1) last, <pad> (0) after."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((len(LENGTHS), max(LENGTHS)), np.int64)
    for i, n in enumerate(LENGTHS):
        ids[i, :n - 1] = rng.integers(3, vocab, n - 1)
        ids[i, n - 1] = 1
    return ids, (np.arange(ids.shape[1])[None] < np.array(LENGTHS)[:, None]).astype(np.int64)


def reference_outputs(model, ids, mask) -> dict:
    """{'layers': (num_layers, B, L, d) each T5Block's output, 'last_hidden_state': (B, L, d)} from torch."""
    import torch
    layers = []
    hooks = [b.register_forward_hook(lambda mod, inp, out: layers.append(out[0] if isinstance(out, tuple) else out))
             for b in model.encoder.block]
    try:
        with torch.no_grad():
            out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    finally:
        for h in hooks:
            h.remove()
    return {"layers": np.stack([t.numpy() for t in layers]), "last_hidden_state": out.last_hidden_state.numpy()}


def main(path=os.path.join(os.path.dirname(os.path.abspath(__file__)), "t5_fixture.npz")):
    ids, mask = batch()
    arrays = {"ids": ids.astype(np.int32), "attention_mask": mask.astype(np.int32)}
    for j, proj in enumerate(PROJS):
        model = tiny_t5(proj, seed=j)
        ref = reference_outputs(model, ids, mask)
        arrays[f"{proj}:config"] = np.array(json.dumps(model.config.to_dict()))
        arrays.update({f"{proj}:w:{k}": v.numpy().astype(np.float32) for k, v in model.state_dict().items()
                       if k != "encoder.embed_tokens.weight"})  # tied to shared.weight
        arrays[f"{proj}:layers"], arrays[f"{proj}:last_hidden_state"] = ref["layers"], ref["last_hidden_state"]
    np.savez_compressed(path, **arrays)
    print(path, os.path.getsize(path), "bytes")


if __name__ == "__main__":
    main()
