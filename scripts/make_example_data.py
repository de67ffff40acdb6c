"""Build the small bundled data sets in examples/data/ from the shared raw data.

    python scripts/make_example_data.py [--raw ../shared/data] [--out examples/data]

Deterministic (fixed seed, inputs read in file order): running it again gives the same files.
HH-RLHF records are used at most once across the files, and the HH-RLHF parts of
sft_demos.jsonl, prompts.jsonl and hh_pairs.jsonl share no opening user turn, so the reward
model and the policy are never evaluated on a prompt the SFT data contained.
"""

import argparse
import logging
import random
import shutil
from pathlib import Path

from rlhfkit.data import (
    Comparison,
    Demonstration,
    comparison_to_json,
    demonstration_to_json,
    prompt_to_json,
    read_hh_rlhf,
    read_oasst_comparisons,
    read_oasst_demonstrations,
    read_prompts,
    read_self_instruct,
    write_jsonl,
)

REPO = Path(__file__).resolve().parents[1]
SEED = 0

# How many records of each kind to take.
SFT_HH, SFT_OASST, SFT_SELF_INSTRUCT = 250, 200, 150
MAX_SFT_RESPONSE_CHARS = {"hh": 600, "oasst": 1000, "self-instruct": 1000}  # short answers suit a 135M model
PROMPTS_LOTTERY, PROMPTS_HH_PER_SUBSET = 200, 50  # HH prompts from helpful-base and harmless-base
PAIRS_PER_SUBSET = {"harmless-base": 800, "helpful-base": 800, "helpful-online": 400, "helpful-rejection-sampled": 1000}


def opening(record) -> str:
    """The first user turn: two records sharing it count as the same prompt."""
    return next(m["content"] for m in record.messages if m["role"] == "user")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--raw", type=Path, default=REPO.parent / "shared" / "data", help="the shared raw data folder")
    parser.add_argument("--out", type=Path, default=REPO / "examples" / "data")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the readers report what they skipped
    raw, out = args.raw, args.out
    rng = random.Random(SEED)

    hh = {name: read_hh_rlhf(raw / "hh-rlhf" / f"{name}.jsonl.gz") for name in PAIRS_PER_SUBSET}
    used = set()  # opening user turns already taken from HH-RLHF

    def take(candidates: list[Comparison], n: int) -> list[Comparison]:
        """n random candidates whose opening turn is unused (and distinct among themselves)."""
        picked = []
        for c in rng.sample(candidates, len(candidates)):
            if len(picked) == n:
                break
            if opening(c) not in used:
                used.add(opening(c))
                picked.append(c)
        assert len(picked) == n, f"only {len(picked)} of {n} available"
        return picked

    # 1. SFT demonstrations: HH-RLHF chosen (helpful-base, single turn), OASST human replies, Self-Instruct.
    single_turn_short = [
        c for c in hh["helpful-base"] if len(c.messages) == 1 and len(c.responses[0]) <= MAX_SFT_RESPONSE_CHARS["hh"]
    ]
    demos = [
        demonstration_to_json(Demonstration(c.messages, c.responses[0], c.source))
        for c in take(single_turn_short, SFT_HH)
    ]
    oasst_demos = [
        d
        for d in read_oasst_demonstrations(raw / "oasst" / "en_100_tree.jsonl")
        if len(d.response) <= MAX_SFT_RESPONSE_CHARS["oasst"]
    ]
    demos += [demonstration_to_json(d) for d in rng.sample(oasst_demos, SFT_OASST)]
    self_instruct = [
        d
        for d in read_self_instruct(raw / "self-instruct" / "user_oriented_instructions.jsonl")
        if len(d.response) <= MAX_SFT_RESPONSE_CHARS["self-instruct"]
    ]
    demos += [demonstration_to_json(d) for d in rng.sample(self_instruct, SFT_SELF_INSTRUCT)]
    rng.shuffle(demos)

    # 2. Prompts for PPO and evaluation: the OASST prompt lottery and single-turn HH-RLHF prompts.
    lottery = read_prompts(raw / "oasst" / "prompt_lottery_en_250.jsonl")
    prompts = [prompt_to_json(p) | {"source": "oasst/prompt_lottery"} for p in rng.sample(lottery, PROMPTS_LOTTERY)]
    for name in ("helpful-base", "harmless-base"):
        single_turn = [c for c in hh[name] if len(c.messages) == 1]
        prompts += [prompt_to_json(c.messages) | {"source": c.source} for c in take(single_turn, PROMPTS_HH_PER_SUBSET)]
    rng.shuffle(prompts)

    # 3. Reward-model pairs from all four HH-RLHF subsets, none sharing a prompt with the above.
    pairs = [comparison_to_json(c, pairs_form=True) for name, n in PAIRS_PER_SUBSET.items() for c in take(hh[name], n)]
    rng.shuffle(pairs)

    # 4. All OASST K-wise rankings.
    rankings = [comparison_to_json(c) for c in read_oasst_comparisons(raw / "oasst" / "en_100_tree.jsonl")]

    # 5. Prompts from other sources than PPO's, for the evaluation's second column: the Self-Instruct instructions
    #    that are not SFT demonstrations (for PPO on prompts.jsonl), and the whole OASST prompt lottery (for PPO on
    #    HH-RLHF prompts). File order, repeats dropped; no randomness, so the files above are unchanged.
    sft_prompts = {d["messages"][0]["content"] for d in demos if d.get("source") == "self-instruct"}
    self_instruct_prompts = []
    for d in read_self_instruct(raw / "self-instruct" / "user_oriented_instructions.jsonl"):
        record = prompt_to_json(d.messages) | {"source": "self-instruct"}
        if d.messages[0]["content"] not in sft_prompts and record not in self_instruct_prompts:
            self_instruct_prompts.append(record)
    oasst_prompts = []
    for p in lottery:
        record = prompt_to_json(p) | {"source": "oasst/prompt_lottery"}
        if record not in oasst_prompts:
            oasst_prompts.append(record)

    for name, records in [
        ("sft_demos.jsonl", demos),
        ("prompts.jsonl", prompts),
        ("hh_pairs.jsonl", pairs),
        ("oasst_rankings.jsonl", rankings),
        ("self_instruct_prompts.jsonl", self_instruct_prompts),
        ("oasst_prompts.jsonl", oasst_prompts),
    ]:
        n = write_jsonl(out / name, records)
        print(f"{out / name}: {n} records, {(out / name).stat().st_size / 1e6:.2f} MB")

    # 6. The whole HH-RLHF sample as published (configs/reward_hh.yaml and configs/hh.yaml read it with `hh-rlhf:`).
    (out / "hh-rlhf").mkdir(exist_ok=True)
    for name in PAIRS_PER_SUBSET:
        shutil.copyfile(raw / "hh-rlhf" / f"{name}.jsonl.gz", out / "hh-rlhf" / f"{name}.jsonl.gz")
        print(f"{out / 'hh-rlhf' / name}.jsonl.gz: copied, {(out / 'hh-rlhf' / f'{name}.jsonl.gz').stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
