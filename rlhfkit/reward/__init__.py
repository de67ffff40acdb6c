"""Step 2: a reward model trained from human rankings, in the Hugging Face standard format.

The model is a transformers `*ForSequenceClassification` with `num_labels=1` on the causal LM's body,
read at the last real token of prompt + response (the EOS that ends a complete response). Loss, as in
InstructGPT: every strict (better, worse) pair of a comparison, averaged per prompt. After training the
normalisation (mean over reference responses, std over all training responses) is saved in the
folder's config.json (`reward_stats`) and applied by rlhfkit when it scores; plain transformers gives
the raw score. Any other sequence-classification reward model (TRL, the hub) is read too.

    model.py       the model: RewardModel, build_reward_model, where the score is read
    folder.py      the folder format: save, load (standard, peft adapter, earlier rlhfkit), checks
    encoding.py    text -> token rows in the model's layout; comparisons -> training items
    loss.py        the comparison loss
    scoring.py     raw and normalised scores; when the policy's token ids can be reused
    evaluation.py  accuracy, length baseline, calibration
    training.py    `rlhfkit reward`: train, measure the normalisation, save
    frozen_features.py  with train_top_layers: the lower blocks' output cached per row, reused across epochs
    commands.py    `rlhfkit score`, `rlhfkit reward-eval`, `rlhfkit reward-convert`
"""

from .commands import run_reward_convert, run_reward_eval, run_score
from .encoding import (
    EncodedComparison,
    encode_comparison,
    encode_for_reward,
    encode_pair_text,
    expand_comparison,
    pack_comparisons,
    response_scores,
    rows_to_batch,
)
from .evaluation import comparison_metrics, evaluate_reward_model, flat_metrics, print_evaluation
from .folder import (
    STATS_KEY,
    NotARewardModelError,
    check_reward_config,
    convert_legacy_reward_model,
    load_reward_model,
    reward_model_path,
    save_reward_model,
)
from .loss import comparison_loss, pair_terms
from .model import LAYOUT_CHAT_TEMPLATE, LAYOUT_EOS, RewardModel, build_reward_model, last_token_index, score_index
from .scoring import (
    encode_rows,
    layout_of,
    normalise_scores,
    reads_policy_vocabulary,
    score,
    score_comparisons,
    score_rows,
    shares_tokens,
)
from .training import normalisation_stats, reference_responses, run_reward, spread_responses

__all__ = [
    "LAYOUT_CHAT_TEMPLATE",
    "LAYOUT_EOS",
    "STATS_KEY",
    "EncodedComparison",
    "NotARewardModelError",
    "RewardModel",
    "build_reward_model",
    "check_reward_config",
    "comparison_loss",
    "comparison_metrics",
    "convert_legacy_reward_model",
    "encode_comparison",
    "encode_for_reward",
    "encode_pair_text",
    "encode_rows",
    "evaluate_reward_model",
    "expand_comparison",
    "flat_metrics",
    "last_token_index",
    "layout_of",
    "load_reward_model",
    "normalisation_stats",
    "normalise_scores",
    "pack_comparisons",
    "pair_terms",
    "print_evaluation",
    "reads_policy_vocabulary",
    "reference_responses",
    "response_scores",
    "reward_model_path",
    "rows_to_batch",
    "run_reward",
    "run_reward_convert",
    "run_reward_eval",
    "run_score",
    "save_reward_model",
    "score",
    "score_comparisons",
    "score_index",
    "score_rows",
    "shares_tokens",
    "spread_responses",
]
