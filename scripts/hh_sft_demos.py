"""Demonstrations for an SFT backbone of the HH-RLHF reward model: the chosen responses of a seeded sample of the
*training* comparisons of a reward config, split by prompt exactly as `rlhfkit reward` splits them (eval_fraction,
seed), so the SFT model never sees a held-out prompt.

    python scripts/hh_sft_demos.py --out runs/hh_sft_demos.jsonl            # 1,500 of configs/reward_hh.yaml's
    rlhfkit sft --data runs/hh_sft_demos.jsonl --output_dir runs/hh-sft --max_length 256 --train_top_layers 12
    rlhfkit reward -c configs/reward_hh.yaml --model runs/hh-sft/final        # the README's "SFT model as backbone"
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rlhfkit.config import RewardConfig  # noqa: E402
from rlhfkit.data import Demonstration, demonstration_to_json, load_comparisons, split_by_prompt  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/reward_hh.yaml", help="the reward config whose split is kept")
    parser.add_argument("--n", type=int, default=1500, help="training comparisons sampled")
    parser.add_argument("--seed", type=int, default=None, help="the split's and the sample's seed (default: the config's)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    cfg = RewardConfig(**yaml.safe_load(Path(args.config).read_text()))  # the config's defaults for what it leaves out
    seed = cfg.seed if args.seed is None else args.seed
    train, held_out = split_by_prompt(load_comparisons(cfg.data), cfg.eval_fraction, seed=seed)
    picked = random.Random(seed).sample(train, min(args.n, len(train)))
    with open(args.out, "w") as f:
        for c in picked:
            demo = Demonstration(messages=c.messages, response=c.responses[c.ranking[0][0]])
            f.write(json.dumps(demonstration_to_json(demo)) + "\n")
    print(f"{args.out}: {len(picked)} demonstrations of {len(train)} training comparisons ({len(held_out)} held out)")


if __name__ == "__main__":
    main()
