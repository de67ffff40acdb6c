"""HH-RLHF (Anthropic): {"chosen": transcript, "rejected": transcript}, where a transcript is
"\n\nHuman: ...\n\nAssistant: ..." and the two differ only in the last Assistant turn."""

import re
from collections import Counter
from pathlib import Path
from typing import Iterator

from .containers import objects, report
from .records import Comparison, DataError, Demonstration, ReadStats, _get, _Invalid, _string

_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_LAST = "\n\nAssistant:"


def parse_hh_transcript(text: str, field: str = "transcript") -> list[dict]:
    """"\\n\\nHuman: hi\\n\\nAssistant: hello" -> [{"role": "user", ...}, {"role": "assistant", ...}].
    Consecutive turns of one speaker (a few transcripts have them) are joined into one
    message. Turns may come out empty; callers decide what to do with them."""
    parts = _HH_TURN.split(text)  # [text before the first turn, speaker, text, speaker, text, ...]
    if parts[0].strip():
        raise _Invalid(field, "a transcript must start with '\\n\\nHuman:'")
    messages = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        role, content = ("user" if speaker == "Human" else "assistant"), content.strip()
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] = (messages[-1]["content"] + "\n\n" + content).strip()
        else:
            messages.append({"role": role, "content": content})
    return messages


def _hh_source(path) -> str:
    """hh-rlhf/helpful-base from .../helpful-base.jsonl.gz"""
    name = Path(path).name
    for suffix in (".gz", ".jsonl", ".json"):
        name = name.removesuffix(suffix)
    return f"hh-rlhf/{name}"


def read_hh_rlhf(path, *, stats: ReadStats | None = None) -> list[Comparison]:
    """HH-RLHF pairs as comparisons (chosen is response 0). Each transcript is split at its
    last "\\n\\nAssistant:" into prompt and response. A line that is not two transcripts is a
    DataError; the known quirks of the real data are skipped and counted:
      identical           chosen and rejected are the same (up to surrounding whitespace)
      prompt_mismatch     the two prompts differ (a response contained "\\n\\nAssistant:")
      empty_response      a side's last Assistant turn is empty
      empty_turn          an empty turn inside the prompt
      prompt_not_user_last  the prompt ends with an Assistant turn"""
    return list(iter_hh_rlhf(path, stats=stats))


def iter_hh_rlhf(path, *, stats: ReadStats | None = None) -> Iterator[Comparison]:
    """`read_hh_rlhf`, one record at a time."""
    source, count, skipped, line_no = _hh_source(path), 0, Counter(), 1
    for line_no, obj in objects(path):
        try:
            sides = {}
            for key in ("chosen", "rejected"):
                text = _string(_get(obj, key), key)
                cut = text.rfind(_HH_LAST)
                if cut < 0:
                    raise _Invalid(key, "no '\\n\\nAssistant:' turn in the transcript")
                sides[key] = (text[:cut], text[cut + len(_HH_LAST) :].strip())
            (prompt, chosen), (other_prompt, rejected) = sides["chosen"], sides["rejected"]
            messages = parse_hh_transcript(prompt, "chosen")
            if not messages:
                raise _Invalid("chosen", "no Human turn before the last '\\n\\nAssistant:'")
        except _Invalid as e:
            raise DataError(path, line_no, e.field, e.what) from None
        if obj["chosen"] == obj["rejected"] or (prompt == other_prompt and chosen == rejected):
            skipped["identical"] += 1
        elif prompt != other_prompt:
            skipped["prompt_mismatch"] += 1
        elif not chosen or not rejected:
            skipped["empty_response"] += 1
        elif not all(m["content"] for m in messages):
            skipped["empty_turn"] += 1
        elif messages[-1]["role"] != "user":
            skipped["prompt_not_user_last"] += 1
        else:
            count += 1
            yield Comparison(messages, [chosen, rejected], [[0], [1]], source)
    report(path, "comparisons", count, skipped, stats, line_no)


def read_hh_rlhf_demonstrations(path, *, stats: ReadStats | None = None) -> list[Demonstration]:
    """The chosen side of every HH-RLHF pair that read_hh_rlhf keeps."""
    return list(iter_hh_rlhf_demonstrations(path, stats=stats))


def iter_hh_rlhf_demonstrations(path, *, stats: ReadStats | None = None) -> Iterator[Demonstration]:
    return (Demonstration(c.messages, c.responses[0], c.source) for c in iter_hh_rlhf(path, stats=stats))
