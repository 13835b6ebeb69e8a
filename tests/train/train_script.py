"""A small training run, used by the tests as a subprocess (kill/resume, multi-process).

python tests/train/train_script.py WORKDIR STEPS [--process-id I --num-processes N --port P] [key=value ...]
Writes WORKDIR/final.npz (flattened final params) and WORKDIR/losses.json on process 0.
"""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import numpy as np  # noqa: E402


def main():
    workdir, steps = sys.argv[1], int(sys.argv[2])
    rest = sys.argv[3:]
    opts = {}
    while rest and rest[0].startswith("--"):
        opts[rest[0][2:]] = rest[1]
        rest = rest[2:]
    import jax
    from jax.experimental import multihost_utils
    from experiments.configs.lexinvariant import get_config
    from jaxemb.config import apply_overrides
    from jaxemb.data import text
    from jaxemb.models.lexinvariant import LanguageModelTask
    from jaxemb.train import Trainer

    cfg = get_config("tiny")
    cfg.train.update(steps=steps, log_every=1, eval_every=0, checkpoint_every=2, progress=False)
    cfg.model.kind = "lexinvariant"
    if "process-id" in opts:
        cfg.distributed.update(coordinator=f"127.0.0.1:{opts['port']}", process_id=int(opts["process-id"]),
                               num_processes=int(opts["num-processes"]))
    apply_overrides(cfg, rest)
    docs = text.chunk_docs(text.pydoc_docs())[:60]
    tok = text.ByteTokenizer()
    source = text.PackedSource(text.pack([tok.encode(d) for d in docs], cfg.data.seq_len),
                               cfg.train.batch_size, seed=3)
    trainer = Trainer(LanguageModelTask(cfg.model, cfg.data.seq_len), cfg, workdir)
    state = trainer.fit(source).state
    params = jax.tree.map(lambda x: np.asarray(jax.device_get(x)) if x.is_fully_addressable else
                          np.asarray(multihost_utils.process_allgather(x, tiled=True)),
                          state["params"])
    if jax.process_index() == 0:
        flat = {"/".join(str(k.key) for k in path): v
                for path, v in jax.tree_util.tree_flatten_with_path(params)[0]}
        np.savez(os.path.join(workdir, "final.npz"), **flat)
        from jaxemb.train.metrics import read_metrics
        losses = [r["loss"] for r in read_metrics(os.path.join(workdir, "metrics.jsonl"), "train")]
        with open(os.path.join(workdir, "losses.json"), "w") as f:
            json.dump(losses, f)


if __name__ == "__main__":
    main()
