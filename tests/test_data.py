"""Data formats: readers, validation errors, skip counts, writers, split."""

import gzip
import json
import logging
from pathlib import Path

import pytest

from rlhfkit.data import (
    Comparison,
    DataError,
    Demonstration,
    ReadStats,
    load_comparisons,
    load_demonstrations,
    load_prompts,
    parse_hh_transcript,
    read_comparisons,
    read_demonstrations,
    read_hh_rlhf,
    read_hh_rlhf_demonstrations,
    read_oasst_comparisons,
    read_oasst_demonstrations,
    read_prompts,
    read_self_instruct,
    split_by_prompt,
    write_jsonl,
)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data"


def write_lines(path: Path, lines: list) -> Path:
    """Each item is a JSON value to dump, or a str written as is (for broken lines)."""
    text = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    if path.suffix == ".gz":
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


GOOD_DEMO = {"prompt": "Hi?", "response": "Hello."}
GOOD_PAIR = {"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away."}


# ---------------------------------------------------------------------------------------
# Errors name file, line and field


@pytest.mark.parametrize(
    "reader, bad_line, field, what",
    [
        (read_demonstrations, '{"prompt": "Hi?", "response": ', "<line>", "malformed JSON"),
        (read_demonstrations, {"prompt": "Hi?"}, "response", "missing"),
        (read_demonstrations, {"prompt": "  ", "response": "x"}, "prompt", "empty string"),
        (read_demonstrations, {"prompt": "Hi?", "response": 42}, "response", "expected a string, got a number"),
        (read_demonstrations, [1, 2], "<line>", "expected a JSON object"),
        (
            read_demonstrations,
            {"messages": [user("a"), assistant("b"), user("c")]},
            "messages[2].role",
            "the last message must be the assistant response",
        ),
        (
            read_demonstrations,
            {"messages": [user("a"), {"role": "robot", "content": "b"}]},
            "messages[1].role",
            "unknown role 'robot'",
        ),
        (read_demonstrations, {"messages": [user("a"), {"role": "assistant"}]}, "messages[1].content", "missing"),
        (read_demonstrations, {"messages": [assistant("b")]}, "messages[0].role", "must follow a user turn"),
        (read_comparisons, {"messages": [user("a"), assistant("b")], "chosen": "x", "rejected": "y"},
         "messages[1].role", "must end with a user turn"),
        (read_comparisons, {"prompt": "Hi?", "chosen": "x"}, "rejected", "missing"),
        (read_comparisons, {"prompt": "Hi?", "chosen": "", "rejected": "y"}, "chosen", "empty string"),
        (read_comparisons, {"prompt": "Hi?", "responses": ["a", "b", "c"], "ranking": [0, 0, 1]}, "ranking",
         "index 0 appears more than once"),
        (read_comparisons, {"prompt": "Hi?", "responses": ["a", "b"], "ranking": [0, 2]}, "ranking",
         "index 2 is out of range"),
        (read_comparisons, {"prompt": "Hi?", "responses": ["a", "b", "c"], "ranking": [[0, 1]]}, "ranking",
         "not a permutation of the 3 responses: missing [2]"),
        (read_comparisons, {"prompt": "Hi?", "responses": ["a", "b"], "ranking": ["0", "1"]}, "ranking",
         "an index or a non-empty list"),
        (read_comparisons, {"prompt": "Hi?", "responses": ["a"], "ranking": [0]}, "responses", "at least 2"),
        (read_comparisons, {"prompt": "Hi?", "response": "a", "score": 9}, "score", "out of range [1, 7]"),
        (read_comparisons, {"prompt": "Hi?", "response": "a", "score": "7"}, "score", "expected a number"),
        (read_comparisons, {"prompt": "Hi?", "responses": ["a", "b"], "ranking": [0, 1], "scores": [1, 0]},
         "scores[1]", "out of range"),
        (read_comparisons, {"prompt": "Hi?"}, "responses", "missing"),
        (read_prompts, {"messages": [user("a"), assistant("b")]}, "messages[1].role", "must end with a user turn"),
        (read_prompts, 17, "<line>", "expected a string or an object"),
        (read_prompts, '""', "<line>", "empty string"),
    ],
)
def test_bad_record_names_file_line_and_field(tmp_path, reader, bad_line, field, what):
    good = GOOD_PAIR if reader is read_comparisons else GOOD_DEMO
    # The bad record is on line 4, after a good one and a blank line (blank lines are skipped but counted).
    path = write_lines(tmp_path / "data.jsonl", [good, good, "", bad_line, good])
    with pytest.raises(DataError) as error:
        reader(path)
    message = str(error.value)
    assert message.startswith(f"{path}:4: field '{field}': "), message
    assert what in message
    assert (error.value.line, error.value.field) == (4, field)


def test_file_with_no_records(tmp_path):
    for lines in ([], ["", "   "]):
        path = write_lines(tmp_path / "empty.jsonl", lines)
        with pytest.raises(DataError, match=r"empty\.jsonl:\d+: field '<file>': no demonstrations"):
            read_demonstrations(path)
    # Everything skipped also means no records, and the message says why.
    path = write_lines(tmp_path / "same.jsonl", [{"prompt": "a", "chosen": "x", "rejected": "x"}])
    with pytest.raises(DataError, match="no comparisons in file \\(skipped: identical=1\\)"):
        read_comparisons(path)


def test_comparison_built_in_code_is_validated():
    with pytest.raises(ValueError, match="field 'ranking'"):
        Comparison([user("a")], ["x", "y"], [[0]])
    with pytest.raises(ValueError, match="must end with a user turn"):
        Demonstration([user("a"), assistant("b")], "c")


# ---------------------------------------------------------------------------------------
# Comparisons: pairs, K-wise, ratings


def test_kwise_ranking_expands_to_pairs_with_ties(tmp_path):
    line = {"prompt": "Q", "responses": ["a", "b", "c", "d"], "ranking": [2, [0, 3], 1], "annotator": "ann1",
            "flags": ["pii"]}
    (c,) = read_comparisons(write_lines(tmp_path / "k.jsonl", [line]))
    assert c.ranking == [[2], [0, 3], [1]]
    assert sorted(c.pairs()) == sorted([(2, 0), (2, 3), (2, 1), (0, 1), (3, 1)])  # nothing between 0 and 3
    assert c.meta == {"annotator": "ann1", "flags": ["pii"]}
    assert c.margin(2, 1) is None

    (full,) = read_comparisons(write_lines(tmp_path / "k4.jsonl", [line | {"ranking": [3, 1, 0, 2]}]))
    assert len(full.pairs()) == 4 * 3 // 2
    assert full.pairs()[0] == (3, 1)


def test_pairs_form(tmp_path):
    lines = [
        {"messages": [{"role": "system", "content": "Be brief."}, user("Q")], "chosen": "good", "rejected": "bad",
         "source": "mine"},
        {"prompt": "Q2", "system": "S", "chosen": "good", "rejected": "bad"},
    ]
    first, second = read_comparisons(write_lines(tmp_path / "p.jsonl", lines))
    assert first.responses == ["good", "bad"] and first.pairs() == [(0, 1)] and first.source == "mine"
    assert second.messages == [{"role": "system", "content": "S"}, user("Q2")]


def test_ratings_group_by_prompt_and_ties_give_only_strict_pairs(tmp_path, caplog):
    lines = [
        {"prompt": "Q", "response": "a", "score": 6},
        {"prompt": "other", "response": "only one", "score": 5},
        {"prompt": "Q", "response": "b", "score": 3},
        {"prompt": "Q", "response": "c", "score": 6},
        {"prompt": "flat", "response": "x", "score": 4},
        {"prompt": "flat", "response": "y", "score": 4},
    ]
    stats = ReadStats()
    with caplog.at_level(logging.INFO, logger="rlhfkit.data"):
        (c,) = read_comparisons(write_lines(tmp_path / "r.jsonl", lines), stats=stats)
    assert c.responses == ["a", "b", "c"]
    assert c.ranking == [[0, 2], [1]]
    assert sorted(c.pairs()) == [(0, 1), (2, 1)]  # a and c tie
    assert c.scores == [6, 3, 6] and c.margin(0, 1) == 3
    assert stats.records == 1 and stats.skipped == {"single_rating": 1, "all_ratings_equal": 1}
    assert "skipped 2" in caplog.text


def test_score_range_is_configurable(tmp_path):
    lines = [{"prompt": "Q", "response": "a", "score": 0}, {"prompt": "Q", "response": "b", "score": 10}]
    path = write_lines(tmp_path / "r.jsonl", lines)
    with pytest.raises(DataError, match=":1: field 'score'"):
        read_comparisons(path)
    (c,) = read_comparisons(path, score_range=(0, 10))
    assert c.ranking == [[1], [0]]


# ---------------------------------------------------------------------------------------
# HH-RLHF


def test_hh_transcript_split_at_last_assistant_turn(tmp_path):
    context = "\n\nHuman: Hi\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke."
    line = {"chosen": context + "\n\nAssistant: Why did the chicken...", "rejected": context + "\n\nAssistant: No."}
    path = write_lines(tmp_path / "helpful-base.jsonl.gz", [line])
    (c,) = read_hh_rlhf(path)
    assert c.messages == [user("Hi"), assistant("Hello! How can I help?"), user("Tell me a joke.")]
    assert c.responses == ["Why did the chicken...", "No."] and c.ranking == [[0], [1]]
    assert c.source == "hh-rlhf/helpful-base"
    (d,) = read_hh_rlhf_demonstrations(path)
    assert d == Demonstration(c.messages, "Why did the chicken...", "hh-rlhf/helpful-base")
    assert load_comparisons(f"hh-rlhf:{path}") == [c]
    assert load_prompts(f"hh-rlhf:{path}") == [c.messages]


def test_hh_consecutive_turns_of_one_speaker_are_joined():
    assert parse_hh_transcript("\n\nHuman: a\n\nHuman: b\n\nAssistant: c") == [user("a\n\nb"), assistant("c")]


def test_hh_identical_and_broken_pairs_are_skipped_and_counted(tmp_path, caplog):
    pair = {"chosen": "\n\nHuman: Q\n\nAssistant: good", "rejected": "\n\nHuman: Q\n\nAssistant: bad"}
    lines = [
        pair,
        {"chosen": pair["chosen"], "rejected": pair["chosen"]},  # identical
        {"chosen": pair["chosen"], "rejected": pair["chosen"] + "  "},  # identical up to whitespace
        {"chosen": pair["chosen"], "rejected": "\n\nHuman: other\n\nAssistant: bad"},  # prompts differ
        {"chosen": pair["chosen"], "rejected": "\n\nHuman: Q\n\nAssistant:"},  # empty response
    ]
    stats = ReadStats()
    with caplog.at_level(logging.WARNING, logger="rlhfkit.data"):
        comparisons = read_hh_rlhf(write_lines(tmp_path / "harmless-base.jsonl", lines), stats=stats)
    assert len(comparisons) == 1
    assert stats.records == 1
    assert stats.skipped == {"identical": 2, "prompt_mismatch": 1, "empty_response": 1}
    assert "skipped 4" in caplog.text and "identical=2" in caplog.text


def test_hh_structural_errors(tmp_path):
    path = write_lines(tmp_path / "hh.jsonl", [{"chosen": "\n\nHuman: Q\n\nAssistant: a", "rejected": "no turns"}])
    with pytest.raises(DataError) as error:
        read_hh_rlhf(path)
    assert str(error.value) == f"{path}:1: field 'rejected': no '\\n\\nAssistant:' turn in the transcript"
    path = write_lines(tmp_path / "hh.jsonl", [{"chosen": "\n\nHuman: Q\n\nAssistant: a"}])
    with pytest.raises(DataError, match=r"hh\.jsonl:1: field 'rejected': missing"):
        read_hh_rlhf(path)


# ---------------------------------------------------------------------------------------
# OpenAssistant trees


def node(role, text, rank=None, synthetic=False, deleted=False, replies=()):
    out = {"role": role, "text": text, "synthetic": synthetic, "deleted": deleted, "lang": "en",
           "message_id": text, "replies": list(replies)}
    if rank is not None:
        out["rank"] = rank
    return out


def test_oasst_human_replies_only_best_rank_first(tmp_path):
    tree = node("prompter", "Q", replies=[
        node("assistant", "second", rank=1),
        node("assistant", "model-written", rank=0, synthetic=True),
        node("assistant", "best", rank=0, replies=[
            node("prompter", "follow-up", replies=[node("assistant", "answer")]),
        ]),
        node("assistant", "removed", rank=2, deleted=True),
        node("assistant", "unranked"),
        node("assistant", "third", rank=2),
    ])
    synthetic_tree = node("prompter", "model prompt", synthetic=True, replies=[node("assistant", "x", rank=0)])
    path = write_lines(tmp_path / "trees.jsonl", [{"message_tree_id": "t1", "prompt": tree},
                                                  {"message_tree_id": "t2", "prompt": synthetic_tree}])

    stats = ReadStats()
    (c,) = read_oasst_comparisons(path, stats=stats)
    assert c.messages == [user("Q")]
    assert c.responses == ["best", "second", "third"]
    assert c.ranking == [[0], [1], [2]]
    assert c.meta["message_tree_id"] == "t1"
    assert stats.skipped == {"synthetic": 2, "deleted": 1, "unranked": 1}

    demos = read_oasst_demonstrations(path)
    assert [d.response for d in demos] == ["best", "answer", "second", "third", "unranked"]
    assert demos[1].messages == [user("Q"), assistant("best"), user("follow-up")]
    assert all(d.source == "oasst" for d in demos)
    assert load_prompts(f"oasst:{path}") == [[user("Q")]]


def test_oasst_bad_node_names_its_path(tmp_path):
    tree = node("prompter", "Q", replies=[node("assistant", "a", rank=0), node("assistant", "", rank=1)])
    path = write_lines(tmp_path / "trees.jsonl", [{"prompt": tree}])
    with pytest.raises(DataError, match=r"trees\.jsonl:1: field 'prompt\.replies\[1\]\.text': empty string"):
        read_oasst_comparisons(path)


# ---------------------------------------------------------------------------------------
# Self-Instruct and prompts


def test_self_instruct(tmp_path):
    line = {"instruction": "Fix the grammar.", "instances": [{"input": "he go", "output": "He goes."},
                                                            {"input": "", "output": "Nothing to fix."}]}
    with_input, without = read_self_instruct(write_lines(tmp_path / "si.jsonl", [line]))
    assert with_input.messages == [user("Fix the grammar.\n\nhe go")] and with_input.response == "He goes."
    assert without.messages == [user("Fix the grammar.")]
    assert with_input.source == "self-instruct"


def test_prompt_forms(tmp_path):
    lines = ['"Just a string"', {"prompt": "Q", "system": "S"}, {"messages": [user("a"), assistant("b"), user("c")]}]
    prompts = read_prompts(write_lines(tmp_path / "prompts.jsonl.gz", lines))
    assert prompts == [[user("Just a string")], [{"role": "system", "content": "S"}, user("Q")],
                       [user("a"), assistant("b"), user("c")]]


# ---------------------------------------------------------------------------------------
# Writing, specs, split


def test_round_trip(tmp_path):
    demos = [
        Demonstration([user("Q")], "A", "src"),
        Demonstration([{"role": "system", "content": "S"}, user("a"), assistant("b"), user("c")], "d"),
    ]
    comparisons = [
        Comparison([user("Q")], ["x", "y", "z"], [[1], [0, 2]], "src", meta={"annotator": "me"}),
        Comparison([user("R")], ["x", "y"], [[0], [1]], scores=[6.0, 2.0]),
    ]
    prompts = [[user("P")], [user("a"), assistant("b"), user("c")]]
    for suffix in (".jsonl", ".jsonl.gz"):
        assert write_jsonl(tmp_path / f"d{suffix}", demos) == 2
        assert read_demonstrations(tmp_path / f"d{suffix}") == demos
        write_jsonl(tmp_path / f"c{suffix}", comparisons)
        assert read_comparisons(tmp_path / f"c{suffix}") == comparisons
        write_jsonl(tmp_path / f"p{suffix}", prompts)
        assert read_prompts(tmp_path / f"p{suffix}") == prompts


def test_load_specs(tmp_path):
    a = write_lines(tmp_path / "a.jsonl", [GOOD_DEMO])
    b = write_lines(tmp_path / "b.jsonl.gz", [{"messages": [user("Q"), assistant("A")]}])
    si = write_lines(tmp_path / "si.jsonl", [{"instruction": "Do", "instances": [{"input": "", "output": "Done"}]}])
    stats = ReadStats()
    demos = load_demonstrations([str(a), f"jsonl:{b}", f"self-instruct:{si}"], stats=stats)
    assert [d.response for d in demos] == ["Hello.", "A", "Done"]
    assert stats.records == 3
    with pytest.raises(ValueError, match="unknown data format 'hhrlhf'"):
        load_demonstrations(f"hhrlhf:{a}")
    with pytest.raises(ValueError, match="no comparisons"):
        load_comparisons(f"self-instruct:{si}")


def test_split_by_prompt_is_disjoint_and_deterministic():
    records = [Demonstration([user(f"prompt {i % 40}")], f"response {i}") for i in range(200)]
    train, evaluation = split_by_prompt(records, 0.25, seed=1)
    assert len(train) + len(evaluation) == 200 and evaluation and train
    assert not {d.messages[0]["content"] for d in train} & {d.messages[0]["content"] for d in evaluation}
    # Same answer again, and for shuffled input (a record's side depends only on its prompt).
    assert split_by_prompt(records, 0.25, seed=1) == (train, evaluation)
    shuffled_train, shuffled_eval = split_by_prompt(records[::-1], 0.25, seed=1)
    assert sorted(d.response for d in shuffled_eval) == sorted(d.response for d in evaluation)
    assert split_by_prompt(records, 0.25, seed=2)[1] != evaluation
    # Tiny sets still get an eval record.
    assert len(split_by_prompt(records[:2], 0.01)[1]) == 1
    assert split_by_prompt(records, 0.0)[1] == []


# ---------------------------------------------------------------------------------------
# Bundled data


def test_bundled_example_data_reads():
    stats = ReadStats()
    assert len(read_demonstrations(EXAMPLES / "sft_demos.jsonl", stats=stats)) == 600
    assert len(read_comparisons(EXAMPLES / "hh_pairs.jsonl", stats=stats)) == 3000
    oasst = read_comparisons(EXAMPLES / "oasst_rankings.jsonl", stats=stats)
    assert len(oasst) == 207 and sum(len(c.pairs()) for c in oasst) == 732
    assert len(read_prompts(EXAMPLES / "prompts.jsonl", stats=stats)) == 300
    assert not stats.skipped
