"""Runs one training job of the official GPSD code (github chqiwang/gpsd-rec) — pretraining or CTR fine-tuning —
and records its evaluations on the validation *and* the test split.

Runs inside the official code's own environment (gin-config, loguru, torcheval, adamw_bf16), started by
``bench/official_gpsd_side_by_side.py``; nothing of the official code is copied here: its ``train.train`` is
called as is, with gin bindings, and its ``train.eval`` is wrapped so that each evaluation point scores both
splits (the official code evaluates one file). Writes ``{"evals": [{"step", "valid_auc", "test_auc"}...]}``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official-repo", required=True, help="a checkout of github chqiwang/gpsd-rec")
    parser.add_argument("--name", required=True, help="the run's name (its checkpoint folder)")
    parser.add_argument("--bind", action="append", default=[], help="a gin binding")
    parser.add_argument("--valid", help="validation file (official format); none for pretraining")
    parser.add_argument("--test", help="test file (official format)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", required=True, help="JSON written when the run ends")
    args = parser.parse_args()

    import torch
    torch.set_num_threads(args.threads)
    sys.path.insert(0, os.path.join(args.official_repo, "src"))
    import gin
    import train as official  # the official src/train.py

    gin.parse_config(args.bind)
    evals = []
    original_eval = official.eval

    def eval_both(model, summary_writer, global_step=0, **_):
        if not args.valid:
            return None
        valid = original_eval(model=model, summary_writer=summary_writer, global_step=global_step,
                              data_path=args.valid)
        test = original_eval(model=model, summary_writer=summary_writer, global_step=global_step,
                             data_path=args.test)
        evals.append({"step": global_step, "valid_auc": valid, "test_auc": test})
        return valid

    official.eval = eval_both
    started = time.perf_counter()
    official.train(ckpt_name=args.name)
    with open(args.out, "w") as f:
        json.dump({"name": args.name, "bindings": args.bind, "evals": evals,
                   "wall_s": round(time.perf_counter() - started, 1)}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
