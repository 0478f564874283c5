"""Write a label-free verl dataset (train/val parquet) from a cmerl prompt set, ready for CME rewards.

    python examples/verl/make_dataset.py ultrafeedback runs/verl-data [--val 64]

Rows follow verl's layout (data_source, prompt as chat messages, ability, extra_info); then
cmerl.integrations.verl.prepare_dataset adds extra_info.prompt (verl does not pass prompts to reward
functions) and reward_model.ground_truth = "" (verl requires the key). Run prepare_dataset alone on an
existing verl parquet file to make it usable with CME.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from cmerl.data import read_prompts
from cmerl.integrations.verl import prepare_dataset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("prompts", help="bundled prompt set (ultrafeedback, alpaca_eval) or a JSONL file")
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--val", type=int, default=64, help="prompts held out for validation")
    args = ap.parse_args()
    prompts = read_prompts(args.prompts)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    splits = {"val": prompts[: args.val], "train": prompts[args.val:]}
    for split, rows in splits.items():
        raw = args.out_dir / f"{split}.raw.parquet"
        messages = [p if isinstance(p, list) else [{"role": "user", "content": p}] for p in rows]
        pd.DataFrame({"data_source": [str(args.prompts)] * len(rows), "prompt": messages,
                      "ability": ["chat"] * len(rows),
                      "extra_info": [{"split": split, "index": i} for i in range(len(rows))]}).to_parquet(raw)
        n = prepare_dataset(raw, args.out_dir / f"{split}.parquet")
        raw.unlink()
        print(f"wrote {args.out_dir / f'{split}.parquet'} ({n} rows)")


if __name__ == "__main__":
    main()
