"""TRL's dataset formats read as they are: each gives the same records as rlhfkit's own shapes, and its
documented mistakes give a DataError naming the file, line and field."""

import json

import pytest

from rlhfkit.data import DataError, load_comparisons, load_demonstrations, load_prompts


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


SYSTEM = {"role": "system", "content": "Be brief."}


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_prompt_completion_standard_and_conversational_equal_own_demonstrations(tmp_path):
    own = write(
        tmp_path / "own.jsonl",
        [
            {"prompt": "Hi?", "response": "Hello.", "source": "a"},
            {"messages": [SYSTEM, user("One"), assistant("Two"), user("Three?"), assistant("Four.")]},
        ],
    )
    standard = write(tmp_path / "standard.jsonl", [{"prompt": "Hi?", "completion": "Hello.", "source": "a", "id": 7}])
    conversational = write(
        tmp_path / "conversational.jsonl",
        [
            {"prompt": [user("Hi?")], "completion": [assistant("Hello.")], "source": "a"},
            {"prompt": [SYSTEM, user("One"), assistant("Two"), user("Three?")], "completion": [assistant("Four.")]},
        ],
    )
    expected = load_demonstrations(str(own))
    assert load_demonstrations(str(standard)) == expected[:1]
    assert load_demonstrations(str(conversational)) == expected
    assert expected[0].source == "a"  # the "source" column is kept, extra columns ("id") ignored


def test_preference_explicit_and_implicit_prompt_equal_own_pairs(tmp_path):
    own = write(
        tmp_path / "own.jsonl",
        [
            {"prompt": "Sky?", "chosen": "Blue.", "rejected": "Green.", "source": "helpful"},
            {"messages": [user("Hi"), assistant("Hello"), user("Sky?")], "chosen": "Blue.", "rejected": "Green."},
        ],
    )
    explicit = write(
        tmp_path / "explicit.jsonl",
        [
            {"prompt": [user("Sky?")], "chosen": [assistant("Blue.")], "rejected": [assistant("Green.")], "source": "helpful"},
            {"prompt": [user("Hi"), assistant("Hello"), user("Sky?")], "chosen": [assistant("Blue.")], "rejected": [assistant("Green.")]},
        ],
    )  # fmt: skip
    implicit = write(
        tmp_path / "implicit.jsonl",
        [
            {"chosen": [user("Sky?"), assistant("Blue.")], "rejected": [user("Sky?"), assistant("Green.")], "source": "helpful"},
            # a string "prompt" beside conversations is an implicit prompt (TRL's maybe_extract_prompt); "score" is extra
            {
                "prompt": "Sky?",
                "chosen": [user("Hi"), assistant("Hello"), user("Sky?"), assistant("Blue.")],
                "rejected": [user("Hi"), assistant("Hello"), user("Sky?"), assistant("Green.")],
                "score_chosen": 8.0,
            },
        ],
    )
    expected = load_comparisons(str(own))
    assert load_comparisons(str(explicit)) == expected
    assert load_comparisons(str(implicit)) == expected
    assert expected[0].source == "helpful"


def test_prompt_only_conversational_equals_own_prompts(tmp_path):
    own = write(tmp_path / "own.jsonl", ["Hi?", {"messages": [SYSTEM, user("Sky?")]}])
    trl = write(tmp_path / "trl.jsonl", [{"prompt": "Hi?"}, {"prompt": [SYSTEM, user("Sky?")], "extra": [1, 2]}])
    assert load_prompts(str(trl)) == load_prompts(str(own))
    # the prompts of the other TRL formats: prompt-completion, explicit and implicit preference
    others = [
        {"prompt": "Hi?", "completion": "Hello."},
        {"chosen": [SYSTEM, user("Sky?"), assistant("Blue.")], "rejected": [SYSTEM, user("Sky?"), assistant("Green.")]},
        {"prompt": [user("Hi?")], "chosen": [assistant("Hello.")], "rejected": [assistant("Go.")]},
    ]
    assert load_prompts(str(write(tmp_path / "others.jsonl", others))) == load_prompts(str(own)) + [[user("Hi?")]]


@pytest.mark.parametrize(
    "loader, record, field, what",
    [
        # implicit prompt: the two conversations differ before the last assistant turn
        (
            load_comparisons,
            {"chosen": [user("Sky?"), assistant("Blue.")], "rejected": [user("Grass?"), assistant("Green.")]},
            "rejected[0]",
            "differs from chosen[0]",
        ),
        (
            load_comparisons,
            {"chosen": [user("Sky?"), assistant("Blue.")], "rejected": [user("Sky?"), assistant("Hm"), user("?"), assistant("No")]},
            "rejected",
            "only the last assistant turn may differ",
        ),
        (
            load_comparisons,
            {"chosen": [user("Sky?"), assistant("Blue.")], "rejected": [user("Sky?")]},
            "rejected[0].role",
            "must end with the assistant turn",
        ),
        (
            load_comparisons,
            {"chosen": [assistant("Blue.")], "rejected": [assistant("Green.")]},
            "chosen",
            "no prompt before the assistant turn",
        ),
        (load_comparisons, {"chosen": "The sky is blue.", "rejected": "The sky is green."}, "prompt", "implicit one"),
        # explicit prompt: chosen must be the assistant turn only
        (
            load_comparisons,
            {"prompt": [user("Sky?")], "chosen": [user("Sky?"), assistant("Blue.")], "rejected": [assistant("Green.")]},
            "chosen",
            "expected one assistant message",
        ),
        (
            load_demonstrations,
            {"prompt": [user("Hi?")], "completion": [assistant("A"), assistant("B")]},
            "completion",
            "expected one assistant message",
        ),
        (load_demonstrations, {"prompt": [assistant("Hi?")], "completion": "A"}, "prompt[0].role", "must end with a user turn"),
        (load_demonstrations, {"completion": "A"}, "prompt", "missing"),
        (load_demonstrations, {"prompt": "Hi?", "completion": "Go away.", "label": False}, "label", "unpaired preference"),
        (load_demonstrations, {"text": "The sky is blue."}, "text", "language-modeling format"),
        (load_prompts, {"prompt": [user("Hi?"), {"role": "user"}]}, "prompt[1].content", "missing"),
    ],
)  # fmt: skip
def test_trl_format_mistakes_name_file_line_and_field(tmp_path, loader, record, field, what):
    good = {
        load_comparisons: {"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go."},
        load_demonstrations: {"prompt": "Hi?", "completion": "Hello."},
        load_prompts: {"prompt": "Hi?"},
    }[loader]
    path = write(tmp_path / "bad.jsonl", [good, good, record])
    with pytest.raises(DataError) as err:
        loader(str(path))
    assert (err.value.line, err.value.field) == (3, field)
    assert what in err.value.what
    assert str(err.value).startswith(f"{path}:3: field '{field}': ")
