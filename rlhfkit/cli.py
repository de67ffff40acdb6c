"""The `rlhfkit` command. Every step reads one YAML config; `--field value` overrides any field.

    rlhfkit sft --config sft.yaml --learning_rate 1e-4 --lora.enabled true
    rlhfkit generate --model runs/sft --prompts prompts.jsonl
    rlhfkit candidates --prompts prompts.jsonl --model runs/sft --model default -k 4 -o tasks.jsonl
    rlhfkit reward --config configs/reward.yaml --lora.enabled true
    rlhfkit dpo --config configs/dpo.yaml --loss ipo
    rlhfkit score --reward-model runs/reward --input pairs.jsonl -o scores.jsonl
    rlhfkit reward-eval --reward-model runs/reward --data hh-rlhf:helpful-base.jsonl.gz -o eval.json
    rlhfkit config-doc sft
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Optional

import typer

from .config import ConfigError, describe, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True, help="RLHF for causal language models: SFT -> reward model -> PPO, and the human feedback around them.")
OVERRIDES = {"allow_extra_args": True, "ignore_unknown_options": True}
ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config of the run (all fields have defaults).")


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # peft 0.21 asks every wrapped model for transformers' old attribute name; nothing a user can act on.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def _load(cls, config: Optional[Path], extra: list[str]):
    try:
        return load_config(cls, config, extra)
    except ConfigError as e:
        typer.secho(str(e), fg="red", err=True)
        raise typer.Exit(2)


def _config_classes() -> dict[str, type]:
    from . import config as c

    return {name: getattr(c, cls) for name, cls in CONFIGS.items() if hasattr(c, cls)}


CONFIGS = {"sft": "SFTConfig", "generate": "GenerateConfig", "reward": "RewardConfig", "ppo": "PPOConfig", "dpo": "DPOConfig", "candidates": "CandidatesConfig",
           "pipeline": "PipelineConfig", "evaluate": "EvaluateConfig", "chat": "ChatConfig"}


@app.command(context_settings=OVERRIDES)
def sft(ctx: typer.Context, config: Optional[Path] = ConfigOpt):
    """Step 1: supervised fine-tuning on demonstrations (loss on response tokens only)."""
    from .config import SFTConfig
    from .sft import run_sft

    _setup_logging()
    cfg = _load(SFTConfig, config, ctx.args)
    out = _run_guarded(lambda: run_sft(cfg))
    typer.echo(f"SFT model: {out}\nmetrics: {Path(cfg.output_dir) / 'metrics.jsonl'} (TensorBoard: {Path(cfg.output_dir) / 'tb'})")


@app.command(context_settings=OVERRIDES)
def generate(
    ctx: typer.Context,
    config: Optional[Path] = ConfigOpt,
    model: Optional[str] = typer.Option(None, help="Run folder, model folder, hub id or 'default'."),
    prompts: Optional[str] = typer.Option(None, help="Prompts JSONL."),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Output JSONL."),
):
    """Sample responses to prompts and write them as JSONL."""
    from .config import GenerateConfig
    from .generate import run_generate

    _setup_logging()
    extra = list(ctx.args)
    for name, value in (("model", model), ("prompts", prompts), ("output", output)):
        if value is not None:
            extra += [f"--{name}", value]
    cfg = _load(GenerateConfig, config, extra)
    out = _run_guarded(lambda: run_generate(cfg))
    typer.echo(f"responses: {out}")


@app.command(context_settings=OVERRIDES)
def candidates(
    ctx: typer.Context,
    config: Optional[Path] = ConfigOpt,
    model: Optional[list[str]] = typer.Option(None, "--model", "-m", help="A model to sample from (repeat for several): run folder, model folder, hub id or 'default'."),
    k: Optional[int] = typer.Option(None, "-k", "--k", help="Responses per prompt, split across the models round-robin."),
    prompts: Optional[str] = typer.Option(None, help="Prompts JSONL."),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Task JSONL for `rlhfkit label serve --tasks`."),
):
    """Sample K responses per prompt from one or several models and write a labelling task file."""
    import json

    from .candidates import run_candidates
    from .config import CandidatesConfig

    _setup_logging()
    extra = list(ctx.args)
    if model:
        extra += ["--models", json.dumps(model)]
    for name, value in (("k", k), ("prompts", prompts), ("output", output)):
        if value is not None:
            extra += [f"--{name}", str(value)]
    cfg = _load(CandidatesConfig, config, extra)
    try:
        out = _run_guarded(lambda: run_candidates(cfg))
    except ValueError as e:  # an unknown format prefix, or no prompt got 2 distinct responses
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(1)
    typer.echo(f"tasks: {out}  (next: rlhfkit label serve --tasks {out})")


@app.command(context_settings=OVERRIDES)
def reward(ctx: typer.Context, config: Optional[Path] = ConfigOpt):
    """Step 2: train a reward model on comparisons (pairs, K-wise rankings, ratings)."""
    from .config import RewardConfig
    from .reward import run_reward

    _setup_logging()
    cfg = _load(RewardConfig, config, ctx.args)
    out = _run_guarded(lambda: run_reward(cfg))
    typer.echo(f"reward model: {out}\nmetrics: {Path(cfg.output_dir) / 'metrics.jsonl'} (TensorBoard: {Path(cfg.output_dir) / 'tb'})")


RewardModelOpt = typer.Option(
    ..., "--reward-model", "-m", help="Reward model: a folder, its run folder, or a hub id in the HF cache (any sequence-classification model with one label)."
)


@app.command()
def score(
    reward_model: str = RewardModelOpt,
    input: str = typer.Option(..., "--input", "-i", help="Comparisons (any form, format prefix allowed) or {prompt, response} JSONL."),
    output: str = typer.Option("scores.jsonl", "--output", "-o", help="Output JSONL."),
    batch_size: int = typer.Option(16, help="Rows scored together."),
    raw: bool = typer.Option(False, "--raw", help="Write raw scores instead of normalised ones."),
):
    """Score responses with a reward model: one line per comparison, or one score per response."""
    from .reward import NotARewardModelError, run_score

    _setup_logging()
    out = _run_guarded(lambda: run_score(reward_model, input, output, batch_size, normalise=not raw), (NotARewardModelError,))
    typer.echo(f"scores: {out}")


@app.command("reward-eval")
def reward_eval(
    reward_model: str = RewardModelOpt,
    data: str = typer.Option(..., "--data", "-d", help="Comparisons to evaluate on (a data spec)."),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Write the metrics as JSON here."),
    batch_size: int = typer.Option(16, help="Rows scored together."),
    max_comparisons: int = typer.Option(0, help="Use only the first N comparisons (0: all)."),
    bins: int = typer.Option(10, help="Bins of the calibration table."),
):
    """Pairwise accuracy (overall, per source), margin and calibration of a reward model, next to the length baseline."""
    from .reward import NotARewardModelError, print_evaluation, run_reward_eval

    _setup_logging()
    metrics = _run_guarded(lambda: run_reward_eval(reward_model, data, output, batch_size, max_comparisons, bins), (NotARewardModelError,))
    print_evaluation(metrics)
    if output:
        typer.echo(f"metrics: {output}")


@app.command("reward-convert")
def reward_convert(
    old: str = typer.Argument(..., help="A reward-model folder of an earlier rlhfkit (with reward_head.safetensors)."),
    new: str = typer.Argument(..., help="Where to write it in the standard form (AutoModelForSequenceClassification)."),
):
    """Rewrite an earlier rlhfkit reward-model folder in the Hugging Face standard form (same normalised scores)."""
    from .reward import NotARewardModelError, run_reward_convert

    _setup_logging()
    out = _run_guarded(lambda: run_reward_convert(old, new), (NotARewardModelError,))
    typer.echo(f"reward model: {out}")


@app.command(context_settings=OVERRIDES)
def ppo(ctx: typer.Context, config: Optional[Path] = ConfigOpt):
    """Step 3: PPO (or RLOO, GRPO: --algorithm rloo|grpo) against the reward model with a KL penalty toward the SFT policy."""
    from .config import PPOConfig
    from .rl import run_ppo

    _setup_logging()
    cfg = _load(PPOConfig, config, ctx.args)
    out = _run_guarded(lambda: run_ppo(cfg))
    typer.echo(
        f"policy: {out}\nmetrics: {Path(cfg.output_dir) / 'metrics.jsonl'} (TensorBoard: {Path(cfg.output_dir) / 'tb'}), "
        f"samples: {Path(cfg.output_dir) / 'samples.jsonl'}"
    )


@app.command(context_settings=OVERRIDES)
def dpo(ctx: typer.Context, config: Optional[Path] = ConfigOpt):
    """Step 3 without a reward model: DPO (or IPO, `--loss ipo`) on comparisons, from the SFT policy."""
    from .config import DPOConfig
    from .rl.dpo import ACCURACY_FILE, run_dpo

    _setup_logging()
    cfg = _load(DPOConfig, config, ctx.args)
    out = _run_guarded(lambda: run_dpo(cfg))
    typer.echo(f"policy: {out}\nmetrics: {Path(cfg.output_dir) / 'metrics.jsonl'} (TensorBoard: {Path(cfg.output_dir) / 'tb'}), "
               f"held-out implicit-reward accuracy: {Path(cfg.output_dir) / ACCURACY_FILE}")


@app.command(context_settings=OVERRIDES)
def pipeline(
    ctx: typer.Context,
    config: Optional[Path] = ConfigOpt,
    steps: Optional[str] = typer.Option(None, "--steps", help="Comma-separated steps to run (default: the config's `steps`): sft,reward,judge,ppo,evaluate,report."),
):
    """SFT -> reward model -> PPO -> evaluation -> report in one run folder; re-running continues where it stopped."""
    from .config import PipelineConfig
    from .pipeline import run_pipeline

    _setup_logging()
    cfg = _load(PipelineConfig, config, ctx.args)
    chosen = [s.strip() for s in steps.split(",") if s.strip()] if steps else None
    plan = _run_guarded(lambda: run_pipeline(cfg, chosen))
    eval_json = plan.dirs["evaluate"] / "eval.json"
    if "evaluate" in plan.steps and eval_json.exists():
        import json

        from .evaluate import print_eval_table
        from .pipeline import step_costs

        print_eval_table(json.loads(eval_json.read_text()), step_costs(plan.run))
    typer.echo(f"run folder: {plan.run}")
    if "report" in plan.steps:
        typer.echo(f"report: {plan.run / 'report.html'}")


@app.command(context_settings=OVERRIDES)
def evaluate(ctx: typer.Context, config: Optional[Path] = ConfigOpt):
    """Compare the SFT and the RLHF policy on held-out prompts: reward-model score, win rate, KL from SFT, length, EOS."""
    from .config import EvaluateConfig
    from .evaluate import run_evaluate

    _setup_logging()
    cfg = _load(EvaluateConfig, config, ctx.args)
    out = _run_guarded(lambda: run_evaluate(cfg))
    typer.echo(f"evaluation: {out}\nsamples: {Path(cfg.output_dir) / 'eval_samples.jsonl'}")


@app.command()
def report(
    run_dir: Path = typer.Argument(..., help="A pipeline run folder (or one step's run folder)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Where to write the HTML (default: RUN_DIR/report.html)."),
    samples: int = typer.Option(8, help="Sample prompts shown with both responses."),
):
    """Write one self-contained HTML page: training curves, the evaluation table, sample responses side by side."""
    from .report import render_report

    out = _run_guarded(lambda: render_report(run_dir, output, samples))
    typer.echo(f"report: {out}")


@app.command(context_settings=OVERRIDES)
def chat(
    ctx: typer.Context,
    config: Optional[Path] = ConfigOpt,
    model: Optional[list[str]] = typer.Option(None, "--model", "-m", help="A model to chat with (give it twice to compare two)."),
    host: Optional[str] = typer.Option(None, help="Address to listen on (default 127.0.0.1)."),
    port: Optional[int] = typer.Option(None, help="Port to listen on (default 8000)."),
):
    """A local web page: type a prompt, see one or two models' responses side by side as they are generated."""
    from .chat import run_chat
    from .config import ChatConfig

    _setup_logging()
    overrides = {}
    if model:
        overrides["models"] = list(model)
    if host is not None:
        overrides["host"] = host
    if port is not None:
        overrides["port"] = port
    from .config import ConfigError, merge_dicts, parse_overrides

    try:
        extra = merge_dicts(parse_overrides(list(ctx.args)), overrides)
    except ConfigError as e:
        typer.secho(str(e), fg="red", err=True)
        raise typer.Exit(2)
    cfg = _load(ChatConfig, config, extra)
    _run_guarded(lambda: run_chat(cfg))


@app.command("config-doc")
def config_doc(step: str = typer.Argument(..., help="Which config: " + ", ".join(CONFIGS))):
    """Print every field of a step's config with its default and documentation."""
    classes = _config_classes()
    if step not in classes:
        typer.secho(f"unknown step '{step}'; choose from {', '.join(classes)}", fg="red", err=True)
        raise typer.Exit(2)
    typer.echo(f"# {classes[step].__doc__.strip().splitlines()[0]}")
    typer.echo("\n".join(describe(classes[step])))


def _run_guarded(fn, also: tuple = ()):
    """Run a step; known user errors (and those of `also`) become one red line instead of a traceback."""
    from .data import DataError
    from .models import ModelNotFoundError
    from .training import NonFiniteError

    try:
        return fn()
    except (DataError, ModelNotFoundError, NonFiniteError, ConfigError, FileNotFoundError, *also) as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(1)


def _mount_subcommands() -> None:
    from .labelling.cli import label_app

    app.add_typer(label_app, name="label", help="The annotators' labelling server: serve, add-annotator, export, stats, backup, revoke, rotate, admin-token.")


_mount_subcommands()


def main() -> None:  # pragma: no cover
    """The `rlhfkit` command: restarted once under mimalloc (allocator.py says why), then the app."""
    from .allocator import restart_under_mimalloc

    try:
        restart_under_mimalloc()
    except ValueError as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        raise SystemExit(2)
    try:
        app()
    except SystemExit as done:
        if done.code in (0, None) and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            leave_finished_process()
        raise


def leave_finished_process() -> None:  # pragma: no cover
    """A process of a multi-process run (torchrun / accelerate launch) whose work is done and saved: run Python's
    exit handlers (the process group ends, logs flush), then leave without the interpreter's and C++ static
    teardown, where a gloo thread still joinable now and then aborts the process ("terminate called without an
    active exception", exit -6), which the launcher reports as a failed run."""
    import atexit

    atexit._run_exitfuncs()  # the handlers a normal exit runs (private, but the one way to run them and skip the rest)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
