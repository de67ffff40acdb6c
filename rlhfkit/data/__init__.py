"""Data: the records every step reads, the shapes they are read from, and where they come from.

    records.py        Demonstration, Comparison, prompts (message lists); DataError; field checks
    formats.py        rlhfkit's own shapes (and TRL's beside them); writers
    trl.py            TRL's dataset formats: prompt-completion, preference, prompt-only
    containers.py     JSON Lines, parquet, arrow, CSV, `save_to_disk` folders, hub datasets in the cache
    hh_rlhf.py, oasst.py, self_instruct.py   one reader per public source
    load.py           load_demonstrations / load_comparisons / load_prompts on a spec (stream_*: one at a time); split_by_prompt
    arrow.py          large sets: records streamed to an arrow file, tokenised by `Dataset.map`, memory-mapped

A spec is a source, "FORMAT:SOURCE" (FORMAT one of jsonl, hh-rlhf, oasst, self-instruct), or a list.

Errors: anything wrong in a record raises `DataError("path:line: field 'x': what is wrong")`; for a
dataset (parquet, arrow, a folder, a hub id) the number is the row index, 0-based, as `dataset[i]`.

Skips: records left out on purpose (e.g. HH-RLHF pairs whose two sides are identical) are
never dropped silently. Every reader logs one line per source on the "rlhfkit.data" logger
(a warning when something was skipped) and, given `stats=ReadStats()`, adds to it how
many records it returned and a count per skip reason.
"""

from .arrow import Rows, demonstration_dataset, example_from_row, record_dataset, record_from_row, split_rows, tokenise
from .containers import rows
from .formats import (
    DEFAULT_SCORE_RANGE,
    comparison_to_json,
    demonstration_to_json,
    prompt_to_json,
    read_comparisons,
    read_demonstrations,
    read_prompts,
    write_jsonl,
)
from .hh_rlhf import parse_hh_transcript, read_hh_rlhf, read_hh_rlhf_demonstrations
from .load import (
    FORMATS,
    eval_mask,
    load_comparisons,
    load_demonstrations,
    load_prompts,
    parse_spec,
    prompt_key,
    split_by_prompt,
    stream_comparisons,
    stream_demonstrations,
)
from .oasst import read_oasst_comparisons, read_oasst_demonstrations, read_oasst_prompts
from .records import ROLES, Comparison, DataError, Demonstration, Message, Prompt, ReadStats
from .self_instruct import read_self_instruct

__all__ = [
    "DEFAULT_SCORE_RANGE", "FORMATS", "ROLES", "Comparison", "DataError", "Demonstration", "Message", "Prompt",
    "ReadStats", "comparison_to_json", "demonstration_to_json", "load_comparisons", "load_demonstrations",
    "load_prompts", "parse_hh_transcript", "parse_spec", "prompt_to_json", "read_comparisons",
    "read_demonstrations", "read_hh_rlhf", "read_hh_rlhf_demonstrations", "read_oasst_comparisons",
    "read_oasst_demonstrations", "read_oasst_prompts", "read_prompts", "read_self_instruct", "rows",
    "prompt_key", "split_by_prompt", "write_jsonl",
    # large sets (arrow.py)
    "Rows", "demonstration_dataset", "eval_mask", "example_from_row", "record_dataset", "record_from_row", "split_rows",
    "stream_comparisons", "stream_demonstrations", "tokenise",
]  # fmt: skip
