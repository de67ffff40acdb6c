"""TRL's dataset formats (TRL's docs/source/dataset_formats.md), read as they are.

"Standard" rows hold strings, "conversational" rows hold lists of {"role", "content"} messages:
    prompt-completion   {"prompt", "completion"}            SFT demonstrations
    preference          {"prompt", "chosen", "rejected"}    comparisons (explicit prompt)
                        {"chosen", "rejected"}              comparisons (implicit prompt, conversational:
                                                            the shared prefix of the two conversations)
    prompt-only         {"prompt"}                          PPO and evaluation prompts
Not read: language modeling ({"text"}: no prompt to mask; its conversational form {"messages"} is rlhfkit's
own), unpaired preference ({"prompt", "completion", "label"}) and stepwise supervision.
A conversational prompt ends with a user turn; a completion, chosen or rejected beside an explicit prompt
is one assistant message. As TRL's `maybe_extract_prompt` does, a string "prompt" beside conversational
"chosen"/"rejected" is taken for an implicit prompt (some hub sets add one). Other columns are ignored.
"""

from .records import _Invalid, _json_type, _messages, _prompt_messages, _string


def prompt(value, field: str = "prompt") -> list[dict]:
    """A prompt: a string (standard) or messages ending with a user turn (conversational)."""
    if isinstance(value, list):
        return _prompt_messages(value, field)
    return [{"role": "user", "content": _string(value, field)}]


def assistant_turn(value, field: str) -> str:
    """A completion, chosen or rejected: a string, or a list holding one assistant message."""
    if not isinstance(value, list):
        return _string(value, field)
    messages = _messages(value, field)
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        roles = [m["role"] for m in messages]
        raise _Invalid(field, f"expected one assistant message (the prompt goes in 'prompt'), got roles {roles}")
    return messages[0]["content"]


def prompt_completion(obj: dict) -> tuple[list[dict], str]:
    """(prompt messages, response) of a prompt-completion row."""
    if "prompt" not in obj:
        raise _Invalid("prompt", "missing (a prompt-completion row has 'prompt' and 'completion')")
    if "label" in obj:  # TRL's unpaired preference: a completion marked good or bad is no demonstration
        raise _Invalid("label", "an unpaired preference row (prompt, completion, label) is not a demonstration")
    return prompt(obj["prompt"]), assistant_turn(obj["completion"], "completion")


def has_implicit_prompt(obj: dict) -> bool:
    """A preference row whose prompt is the shared start of two conversations (TRL's rule)."""
    return isinstance(obj.get("chosen"), list) and not isinstance(obj.get("prompt"), list) and "messages" not in obj


def implicit_prompt(obj: dict) -> tuple[list[dict], str, str]:
    """(prompt, chosen, rejected) of {"chosen": conversation, "rejected": conversation}: both must be the
    same conversation up to their last message, an assistant turn."""
    sides = {}
    for key in ("chosen", "rejected"):
        if key not in obj:
            raise _Invalid(key, "missing")
        if not isinstance(obj[key], list):
            raise _Invalid(key, f"expected a conversation like 'chosen', got {_json_type(obj[key])}")
        messages = _messages(obj[key], key)
        last = len(messages) - 1
        if messages[last]["role"] != "assistant":
            raise _Invalid(f"{key}[{last}].role", f"the conversation must end with the assistant turn, not {messages[last]['role']!r}")
        sides[key] = messages
    chosen, rejected = sides["chosen"], sides["rejected"]
    for i, (a, b) in enumerate(zip(chosen[:-1], rejected[:-1])):
        if a != b:
            what = f"differs from chosen[{i}]: the two conversations must be the same up to their last assistant turn"
            raise _Invalid(f"rejected[{i}]", what)
    if len(chosen) != len(rejected):
        what = f"{len(rejected)} messages against {len(chosen)} in chosen: only the last assistant turn may differ"
        raise _Invalid("rejected", what)
    if len(chosen) < 2:
        raise _Invalid("chosen", "no prompt before the assistant turn")
    return _prompt_messages(chosen[:-1], "chosen"), chosen[-1]["content"], rejected[-1]["content"]
