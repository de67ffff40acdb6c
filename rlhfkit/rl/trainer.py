"""What PPO, RLOO and GRPO share: the set-up, the epochs of clipped updates over a rollout, resume,
logging, the samples file, the NaN guard and the final folder. The algorithms (`ppo.py`, `rloo.py`,
`grpo.py`) subclass `OnlineTrainer` and write their `iteration` with these parts.

Multi-process (`accelerate launch`): every process rolls out its share of each iteration's prompts; the
trained networks are one DDP module (`ActorCritic`), so one backward syncs all; each micro-batch loss is a
sum over its units (tokens or responses, `token_weights`) divided by the minibatch's units over all
processes; the logged statistics are reduced over processes.

Sharded (FSDP2, `configs/accelerate/fsdp2.yaml`): the same module is sharded by transformer block, and so is
a full fine-tuning reference (`shard_frozen`); the reward model is kept whole. Sampling and the experience
passes run inside `gathered`: the shards are all-gathered once for each phase of a rollout (not once per
token), and the processes then run their own, unequal, forward passes; the training passes are collectives
(every process runs as many micro-batches). Checkpoints are accelerate's distributed checkpoint; the final
policy is gathered whole on the main process.

Phases and their metrics: `time/generation` (sampling), `time/scoring` (reward model, reference and
rollout-policy log-probs, values), `time/training` (the epochs). `tokens_per_s/generation` counts generated
response tokens; `tokens_per_s/scoring` and `tokens_per_s/training` count prompt + response tokens read
(training: once per epoch).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from ..config import PPOConfig
from ..data import load_demonstrations, load_prompts
from ..distributed import gathered, parameter_bytes_per_process, shard_frozen, tied_names, uses_fsdp, wrap_blocks
from ..losses import batch_to_inputs, trained_tokens
from ..models import save_model
from ..tokens import encode_example
from ..training import (
    Checkpointer,
    DataPlan,
    MetricsLogger,
    RunDir,
    check_finite,
    make_accelerator,
    make_scheduler,
    save_run_config,
    seed_everything,
)
from .frozen_cache import FrozenCache
from .kl_control import AdaptiveKLController, FixedKLController
from .math import clipped_surrogate, k3_in_loss, masked_mean, weighted_token_sum
from .networks import CRITIC_ADAPTER, POLICY_ADAPTER, ActorCritic, build_networks, load_policy, model_inputs
from .rollout import Experience, Rollout, Samples, sample

log = logging.getLogger("rlhfkit.rl")


class Means:
    """Weighted means (and totals) of named statistics: summed locally, reduced over processes in one all-reduce."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.weights: dict[str, float] = {}
        self.totals: set[str] = set()

    def add(self, name: str, value, weight: float = 1.0) -> None:
        """Add ``value`` (a mean over ``weight`` items) to the running mean of ``name``."""
        self.sums[name] = self.sums.get(name, 0.0) + float(value) * float(weight)
        self.weights[name] = self.weights.get(name, 0.0) + float(weight)

    def total(self, name: str, value) -> None:
        """Add to a count that is reported as its sum over processes, not as a mean."""
        self.sums[name] = self.sums.get(name, 0.0) + float(value)
        self.weights[name] = 0.0
        self.totals.add(name)

    def reduce(self, accelerator) -> dict[str, float]:
        """Means (NaN where nothing was added) and totals over all processes."""
        names = sorted(self.sums)
        t = torch.tensor([[self.sums[n] for n in names], [self.weights[n] for n in names]], dtype=torch.float64, device=accelerator.device)
        if accelerator.num_processes > 1:
            t = accelerator.reduce(t, reduction="sum")
        sums, weights = t.tolist()
        return {n: s if n in self.totals else (s / w if w else float("nan")) for n, s, w in zip(names, sums, weights)}


class PhaseTimer:
    def __init__(self, device):
        self.device = device
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str):
        _sync(self.device)
        t0 = time.perf_counter()
        yield
        _sync(self.device)
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t0


def _sync(device) -> None:
    if torch.cuda.is_available() and str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


def make_optimizer(groups: list[tuple[list[torch.nn.Parameter], float]], cfg: PPOConfig) -> torch.optim.Optimizer:
    """One AdamW with a parameter group per role (policy, critic) and its learning rate; with weight_decay > 0
    each role is split once more so that biases and norm weights (1-D) get none, as in `training.make_optimizer`."""
    param_groups = []
    for params, lr in groups:
        split = [[p for p in params if p.ndim >= 2], [p for p in params if p.ndim < 2]] if cfg.weight_decay else [params]
        for chosen, decay in zip(split, (cfg.weight_decay, 0.0)):
            if chosen:
                param_groups.append({"params": chosen, "lr": lr, "weight_decay": decay})
    try:  # the fused kernel is several times faster than the per-tensor loop (see training.make_optimizer)
        return torch.optim.AdamW(param_groups, betas=cfg.adam_betas, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(param_groups, betas=cfg.adam_betas, foreach=True)


def register_trainable_checkpointing(accelerator, module: ActorCritic) -> None:
    """Checkpoints hold only the trainable weights (adapters + value head with LoRA), not frozen bases."""

    def names() -> list[str]:
        return [n for n, p in module.named_parameters() if p.requires_grad]

    def save_hook(models, weights, output_dir):
        for i, model in enumerate(models):
            if accelerator.unwrap_model(model) is module:
                params = dict(module.named_parameters())
                weights[i] = {n: params[n].detach().contiguous() for n in names()}

    def load_hook(models, input_dir):
        for index, model in enumerate(list(models)):  # `models` is every prepared model, in order: file i is model i
            if accelerator.unwrap_model(model) is module:
                file = Path(input_dir) / ("model.safetensors" if index == 0 else f"model_{index}.safetensors")
                state = load_file(str(file), device=str(next(module.parameters()).device))
                missing, unexpected = set(names()) - set(state), set(state) - set(dict(module.named_parameters()))
                if missing or unexpected:
                    raise RuntimeError(f"{file}: checkpoint does not match the model (missing {sorted(missing)[:3]}, "
                                       f"unexpected {sorted(unexpected)[:3]})")  # fmt: skip
                module.load_state_dict(state, strict=False)
                models.remove(model)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


class OnlineTrainer:
    """Set-up and shared loop of an online method; subclasses define `iteration(it) -> metrics`."""

    name = "online"

    def __init__(self, cfg: PPOConfig):
        if cfg.generation.temperature <= 0:
            raise ValueError("generation.temperature must be > 0 (greedy decoding has no log-probs to ratio)")
        self.cfg = cfg
        self.k = cfg.responses_per_prompt
        self.run = RunDir(cfg.output_dir)
        self.accelerator = acc = make_accelerator(cfg)
        n, responses = acc.num_processes, cfg.prompts_per_iteration * self.k
        if cfg.prompts_per_iteration % n or cfg.minibatch_size % n or responses % cfg.minibatch_size:
            raise ValueError(
                f"prompts_per_iteration ({cfg.prompts_per_iteration}) x samples per prompt ({self.k}) must be a multiple "
                f"of minibatch_size ({cfg.minibatch_size}), and both multiples of the number of processes ({n})"
            )
        seed_everything(cfg.seed)
        if acc.is_main_process:
            save_run_config(cfg, self.run)

        self.sharded = uses_fsdp(acc)
        self.nets = build_networks(cfg, acc.device, sharded=self.sharded)
        self.tokenizer = self.nets.tokenizer
        log.info("%s layout: %s", cfg.algorithm.upper(), self.nets.layout)
        log.info("the reward model scores in %s with fp32 weights, as its statistics were measured", self.nets.rm_stats.get("precision", "fp32"))
        self.prompts = load_prompts(cfg.prompts)
        if not self.prompts:
            raise ValueError(f"{cfg.prompts}: no prompts")
        self.local_minibatch = cfg.minibatch_size // n
        self.n_minibatches = responses // cfg.minibatch_size
        self.micro_per_minibatch = math.ceil(self.local_minibatch / cfg.batch_size)
        self.plan = DataPlan(items=self.prompts, batch_size=cfg.prompts_per_iteration // n, grad_accum=1, num_processes=n,
                             process_index=acc.process_index, seed=cfg.seed)  # fmt: skip
        self.total = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(self.prompts) / cfg.prompts_per_iteration))
        self.ptx_plan = self._ptx_plan() if cfg.ptx_data else None

        policy_names, critic_names = self.nets.trainable_names()
        optimizer = make_optimizer([(self.role_params(policy_names), cfg.learning_rate),
                                    (self.role_params(critic_names), cfg.critic_learning_rate or cfg.learning_rate)], cfg)  # fmt: skip
        scheduler = make_scheduler(optimizer, cfg, self.total * cfg.ppo_epochs * self.n_minibatches)  # scales every group's lr
        if not self.sharded:  # (sharded: accelerate's distributed checkpoint, each process its shard of everything)
            register_trainable_checkpointing(acc, self.nets.actor_critic)
        wrap_blocks(acc, self.nets.actor_critic)  # FSDP2 only: one shard unit per transformer block
        self.model, self.optimizer, self.scheduler = acc.prepare(self.nets.actor_critic, optimizer, scheduler)
        self.ac: ActorCritic = acc.unwrap_model(self.model)
        # FSDP2 replaces every parameter by its shard: the roles' parameters are looked up again by name
        self.ac.freeze_trainable_set()
        self.policy_params, self.critic_params = self.role_params(policy_names), self.role_params(critic_names)
        if self.sharded and self.nets.reference is not None:
            self.nets.reference = shard_frozen(acc, self.nets.reference)
        held = parameter_bytes_per_process(self.model, self.nets.reference, self.nets.reward_model)  # a shard under FSDP2
        log.info("process %d holds %.1f MB of trained and %.1f MB of frozen parameters", acc.process_index, held["trained"] / 2**20, held["frozen"] / 2**20)
        self.kl_ctl = AdaptiveKLController(cfg.init_kl_coef, cfg.target_kl, cfg.kl_horizon) if cfg.adaptive_kl else FixedKLController(cfg.init_kl_coef)
        self.checkpointer = Checkpointer(self.run, acc, cfg.keep_checkpoints)
        self.samples_file = self.run.path / "samples.jsonl"
        self.frozen_cache = FrozenCache(self.nets, acc)
        self.experience_of = Experience(cfg, self.nets, acc)
        self.iteration_index = 0
        self.last_rollout: Rollout | None = None

    def role_params(self, names: list[str]) -> list[torch.nn.Parameter]:
        params = dict(self.nets.actor_critic.named_parameters())
        return [params[name] for name in names]

    def _ptx_plan(self) -> DataPlan:
        demos = load_demonstrations(self.cfg.ptx_data)
        examples = [encode_example(self.tokenizer, d.messages, d.response, self.cfg.ptx_max_length) for d in demos]
        if not examples:
            raise ValueError(f"{self.cfg.ptx_data}: no demonstrations for PPO-ptx")
        return DataPlan(
            items=examples, batch_size=self.cfg.ptx_batch_size, grad_accum=self.micro_per_minibatch,
            num_processes=self.accelerator.num_processes, process_index=self.accelerator.process_index,
            seed=self.cfg.seed + 1, weight=lambda e: float(trained_tokens(e)),
        )  # fmt: skip

    # ------------------------------------------------------------------ the rollout

    def sample(self, messages: list) -> Samples:
        """k responses per prompt, cut after the first EOS."""
        with gathered(self.accelerator, self.model):  # FSDP2: the policy's shards gathered once, not once per token
            return sample(self.ac, self.tokenizer, messages, self.cfg.generation, self.k, self.accelerator.device, self.accelerator.autocast())

    def experience(self, samples: Samples) -> Rollout:
        """Scores, log-probs, values and KL of the samples, once per rollout, on the first epoch's micro-batches."""
        micro_batches = self.rollout_micro_batches(samples)
        reference = self.nets.reference
        # FSDP2: the trained networks' and the reference's shards gathered once for all these passes
        with gathered(self.accelerator, self.model), gathered(self.accelerator, reference) if reference is not None else contextlib.nullcontext():
            frozen = self.frozen_cache.compute(samples, micro_batches)  # train_top_layers: the frozen blocks' output
            return self.experience_of(samples, micro_batches, frozen, self.iteration_index + 1)

    def minibatches(self, n_rows: int, iteration: int, epoch: int) -> tuple[torch.Tensor, ...]:
        """This process's minibatches (row indices) of one epoch: a shuffle seeded by run, iteration, epoch, process."""
        g = torch.Generator().manual_seed(((self.cfg.seed * 100_003 + iteration) * 101 + epoch) * 1009 + self.accelerator.process_index)
        return torch.randperm(n_rows, generator=g).split(self.local_minibatch)

    def micro_batches(self, samples: Samples, rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``rows`` ordered by prompt + response length and split into micro-batches, so they carry little padding."""
        lengths = (samples.prompt_mask.sum(1) + samples.mask.sum(1)).cpu()[rows]
        return rows[torch.argsort(lengths, stable=True)].to(samples.mask.device).split(self.cfg.batch_size)

    def rollout_micro_batches(self, samples: Samples) -> list[torch.Tensor]:
        """The micro-batches of the first epoch, in its order (the no-grad passes use them: first ratio exactly 1)."""
        minibatches = self.minibatches(len(samples), self.iteration_index, 0)
        return [rows for mb in minibatches for rows in self.micro_batches(samples, mb)]

    def frozen_inputs(self, micro: dict) -> dict:
        """The frozen activations the actor-critic's forward takes (None: run the whole network)."""
        return {"policy_frozen": micro.get("policy_frozen"), "critic_frozen": self.nets.critic_frozen(micro.get("policy_frozen"), micro.get("reward_frozen"))}

    # ------------------------------------------------------------------ the epochs

    def optimise(self, rollout: Rollout, targets: dict[str, torch.Tensor], units: torch.Tensor, loss_fn) -> Means:
        """``ppo_epochs`` passes of shuffled minibatches over the rollout. ``targets``: per-row tensors the loss
        reads (advantages, returns); ``units`` ``(B,)``: what a minibatch's loss is averaged over (tokens or
        responses); ``loss_fn(micro, outputs, epoch, stats)`` returns the micro-batch's loss summed over its units."""
        cfg, acc = self.cfg, self.accelerator
        stats = Means()
        for epoch in range(cfg.ppo_epochs):
            minibatches = self.minibatches(len(rollout), self.iteration_index, epoch)
            local = torch.stack([units[mb.to(units.device)].sum() for mb in minibatches]).double()
            global_units = (acc.reduce(local, reduction="sum") if acc.num_processes > 1 else local).tolist()
            for m, mb in enumerate(minibatches):
                step = (self.iteration_index * cfg.ppo_epochs + epoch) * self.n_minibatches + m
                ptx = self.ptx_plan.step(step) if self.ptx_plan else None
                micros = self.micro_batches(rollout, mb)
                for i, rows in enumerate(micros):
                    sync = i == len(micros) - 1 or acc.num_processes == 1
                    with contextlib.nullcontext() if sync else acc.no_sync(self.model):
                        self.micro_step(rollout.micro(rows, **targets), epoch, global_units[m], ptx.micro_batches[i] if ptx else None,
                                        ptx.total_weight if ptx else 0.0, loss_fn, stats)  # fmt: skip
                self.optimiser_step(stats)
        return stats

    def micro_step(self, micro: dict, epoch: int, global_units: float, ptx_micro, ptx_weight: float, loss_fn, stats: Means) -> None:
        cfg, acc = self.cfg, self.accelerator
        ptx = batch_to_inputs(ptx_micro, self.tokenizer.pad_token_id, acc.device) if ptx_micro else None
        with acc.autocast():
            outputs = self.model(**model_inputs(micro), with_entropy=cfg.entropy_coef > 0, ptx=ptx, **self.frozen_inputs(micro))
        loss_sum = loss_fn(micro, outputs, epoch, stats)
        # summed over micro-batches and averaged by DDP over processes = the minibatch's mean over all processes
        total = loss_sum * (acc.num_processes / global_units)
        _, _, _, ptx_sum, ptx_tokens = outputs
        if ptx_sum is not None:
            check_finite("ptx loss", ptx_sum.detach(), self.iteration_index + 1)
            total = total + cfg.ptx_coef * ptx_sum * (acc.num_processes / ptx_weight)
            stats.add("ptx_loss", ptx_sum.item() / max(float(ptx_tokens), 1.0), float(ptx_tokens))
        acc.backward(total)

    def kl_in_loss(self, logprobs: torch.Tensor, micro: dict, weights: torch.Tensor, stats: Means) -> torch.Tensor:
        """GRPO's KL term: beta * k3(pi_theta, pi_ref) per token, weighted like the policy loss (0 unless `kl_in: loss`)."""
        if self.cfg.kl_placement != "loss":
            return logprobs.new_zeros(())
        k3 = k3_in_loss(logprobs, micro["ref_logprobs"], micro["mask"])
        stats.add("kl_loss", masked_mean(k3.detach(), micro["mask"]).item(), float(micro["mask"].sum()))
        return self.kl_ctl.value * weighted_token_sum(k3, weights, micro["mask"])

    def sequence_rewards(self, rollout: Rollout, beta: float) -> torch.Tensor:
        """One reward per response (critic-free methods): the score minus beta times the response's KL (summed
        per-token `kl_estimator`) with `kl_in: reward`; the score alone with `kl_in: loss`."""
        rewards = rollout.scores - beta * rollout.kl.sum(1) if self.cfg.kl_placement == "reward" else rollout.scores
        check_finite("reward", rewards, self.iteration_index + 1)
        return rewards

    def policy_gradient_loss(self, micro: dict, outputs, epoch: int, stats: Means) -> torch.Tensor:
        """The critic-free loss of a micro-batch, summed over its units (``micro["weights"]``, `token_weights`):
        clipped surrogate with per-response advantages + beta * k3 (`kl_in: loss`) - entropy_coef * entropy."""
        logprobs, _, entropy, _, _ = outputs
        mask, weights = micro["mask"], micro["weights"]
        per_token_loss, pg_stats = clipped_surrogate(logprobs, micro["old_logprobs"], micro["advantages"], mask, self.cfg.clip_range)
        pg_loss = weighted_token_sum(per_token_loss, weights, mask)
        loss = pg_loss + self.kl_in_loss(logprobs, micro, weights, stats)
        n_tokens, units = float(mask.sum()), float(micro["units"].sum())
        if entropy is not None:
            loss = loss - self.cfg.entropy_coef * weighted_token_sum(entropy, weights, mask)
            stats.add("entropy_train", masked_mean(entropy, mask).item(), n_tokens)
        check_finite("policy loss", loss.detach(), self.iteration_index + 1)
        stats.add("policy_loss", pg_loss.item() / max(units, 1e-12), units)  # the surrogate alone, as PPO's
        for name, value in (("policy_clipfrac", pg_stats["clipfrac"]), ("approx_kl", pg_stats["approx_kl"]),
                            (f"approx_kl_epoch{epoch + 1}", pg_stats["approx_kl"]), ("ratio", pg_stats["ratio_mean"])):  # fmt: skip
            stats.add(name, value.item(), n_tokens)
        return loss

    def optimiser_step(self, stats: Means) -> None:
        """Clip the policy's and the critic's gradients separately, then one AdamW step over both."""
        step = self.iteration_index + 1
        for name, params in (("policy", self.policy_params), ("critic", self.critic_params)):
            if params:
                norm = self.accelerator.clip_grad_norm_(params, self.cfg.max_grad_norm)
                check_finite(f"{name} gradient norm", norm, step)
                stats.add(f"grad_norm_{name}", float(norm))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------ metrics

    def rollout_stats(self, rollout: Rollout, stats: Means) -> Means:
        """This process's rollout statistics, added to ``stats`` (reduced over processes by `metrics`)."""
        B, mask = float(len(rollout)), rollout.mask
        tokens = float(mask.sum())
        stats.add("score", rollout.rm_scores.mean(), B)
        stats.add("score_penalised", rollout.scores.mean(), B)
        stats.add("kl", rollout.kl_k1.sum(1).mean(), B)
        stats.add("kl_penalty", rollout.kl.sum(1).mean(), B)
        stats.add("entropy", rollout.entropy[mask].mean(), tokens)
        stats.add("response_length", tokens / B, B)
        stats.add("eos_share", rollout.has_eos.float().mean(), B)
        stats.total("tokens_generated", tokens)
        stats.total("tokens_read", tokens + float(rollout.prompt_mask.sum()))
        return stats

    def metrics(self, stats: Means, timer: PhaseTimer, beta: float) -> dict[str, float]:
        """Reduce the statistics over processes; update beta (the controller reads the KL per response); add
        beta, learning rate, phase times, throughput and peak memory."""
        reduced = stats.reduce(self.accelerator)
        self.kl_ctl.update(reduced["kl"], self.cfg.prompts_per_iteration * self.k)
        metrics = {k: v for k, v in reduced.items() if k not in ("tokens_generated", "tokens_read")}
        metrics.update(beta=beta, beta_next=self.kl_ctl.value, lr=self.scheduler.get_last_lr()[0])
        for phase, seconds in timer.seconds.items():
            metrics[f"time/{phase}"] = seconds
        metrics["tokens_per_s/generation"] = reduced["tokens_generated"] / max(timer.seconds["generation"], 1e-9)
        metrics["tokens_per_s/scoring"] = reduced["tokens_read"] / max(timer.seconds["scoring"], 1e-9)
        metrics["tokens_per_s/training"] = reduced["tokens_read"] * self.cfg.ppo_epochs / max(timer.seconds["training"], 1e-9)
        if torch.cuda.is_available() and str(self.accelerator.device).startswith("cuda"):
            metrics["memory/peak_gb"] = torch.cuda.max_memory_allocated(self.accelerator.device) / 2**30
        else:
            import resource

            metrics["memory/peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        check_finite("policy loss", metrics["policy_loss"], self.iteration_index + 1)
        return metrics

    # ------------------------------------------------------------------ running it

    def iteration(self, it: int) -> dict[str, float]:
        raise NotImplementedError

    def write_samples(self, it: int) -> None:
        rollout = self.last_rollout
        kl = rollout.kl_k1.sum(1)
        with self.samples_file.open("a") as f:
            for i in range(min(self.cfg.samples_per_log, len(rollout))):
                tokens = rollout.response_ids[i][rollout.mask[i]].tolist()
                record = {
                    "iteration": it, "prompt": rollout.messages[i][-1]["content"], "messages": rollout.messages[i],
                    "response": self.tokenizer.decode(tokens, skip_special_tokens=True).strip(), "score": float(rollout.rm_scores[i]),
                    "reward_score": float(rollout.scores[i]), "kl": float(kl[i]), "has_eos": bool(rollout.has_eos[i]), "length": len(tokens),
                }  # fmt: skip
                f.write(json.dumps(record) + "\n")

    def _trim_samples(self, resume_step: int) -> None:
        if self.samples_file.exists():
            kept = [l for l in self.samples_file.read_text().splitlines() if l and json.loads(l)["iteration"] <= resume_step]
            self.samples_file.write_text("".join(l + "\n" for l in kept))

    def train(self, stop_after: int | None = None) -> Path:
        """Run (or resume) the iterations; final/ when done (the run folder if stopped early by `stop_after`)."""
        cfg, acc = self.cfg, self.accelerator
        state = self.checkpointer.load_latest() if cfg.resume else None
        start = state["step"] if state else 0
        if state:
            self.kl_ctl.load_state_dict(state["kl_controller"])
        else:
            seed_everything(cfg.seed + acc.process_index)  # each process samples its own responses
        metrics_log = MetricsLogger(self.run, acc.is_main_process, resume_step=start if state else None, accelerator=acc)
        if acc.is_main_process and state:
            self._trim_samples(start)
        bar = tqdm(total=self.total, initial=start, desc=cfg.algorithm, disable=not acc.is_main_process, dynamic_ncols=True)
        stopped = False
        for it in range(start, self.total):
            metrics = self.iteration(it)
            done = it + 1
            if done % cfg.log_every == 0 or done == self.total:
                metrics_log.log(done, metrics)
            if acc.is_main_process and cfg.sample_every and (done % cfg.sample_every == 0 or done == 1):
                self.write_samples(done)
            bar.set_postfix({"score": f"{metrics['score']:.3f}", "kl": f"{metrics['kl']:.3f}", "beta": f"{metrics['beta']:.4f}"})
            bar.update(1)
            if (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == self.total:
                self.checkpointer.save(done, {"total_steps": self.total, "kl_controller": self.kl_ctl.state_dict()})
            if stop_after is not None and stop_after <= done < self.total:
                stopped = True
                break
        bar.close()
        metrics_log.close()
        if stopped:
            return self.run.path
        policy = self.final_policy()
        if acc.is_main_process:
            self.save_final(policy)
        acc.wait_for_everyone()
        return self.run.final

    def final_policy(self) -> torch.nn.Module | None:
        """The tuned policy, whole, on the main process (None on the others); every process calls it. Under FSDP2
        the shards are gathered (accelerate's `get_state_dict`) into a fresh unsharded copy of the policy."""
        if not self.sharded:
            return self.ac.policy if self.accelerator.is_main_process else None
        state = self.accelerator.get_state_dict(self.model)
        if not self.accelerator.is_main_process:
            return None
        policy = load_policy(self.cfg, self.tokenizer)
        mine = {k[len("policy."):]: v for k, v in state.items() if k.startswith("policy.") and f".{CRITIC_ADAPTER}." not in k}
        missing, unexpected = policy.load_state_dict(mine, strict=False)
        missing = [k for k in missing if k not in tied_names(policy)]
        if missing or unexpected:
            raise RuntimeError(f"gathering the sharded policy: missing {missing[:5]}, unexpected {unexpected[:5]}")
        return policy

    def save_final(self, policy: torch.nn.Module | None = None) -> None:
        """The tuned policy (`final_policy`; the trained one itself when unsharded) in final/ (LoRA merged unless
        merge_on_save is false); ppo_state.json (algorithm, iterations, final beta and KL-controller state, inputs,
        layout) in the run folder and in final/."""
        policy = self.ac.policy if policy is None else policy
        if hasattr(policy, "merge_and_unload"):
            policy = copy.deepcopy(policy)
            if CRITIC_ADAPTER in policy.peft_config:
                policy.delete_adapter(CRITIC_ADAPTER)
            policy.set_adapter(POLICY_ADAPTER)
            if self.cfg.lora.merge_on_save:
                policy = policy.merge_and_unload()
        save_model(policy, self.tokenizer, self.run.final, merge_lora=False)
        state = {
            "algorithm": self.cfg.algorithm, "iterations": self.total, "beta": self.kl_ctl.value, "kl_controller": self.kl_ctl.state_dict(),
            "policy_model": self.cfg.policy_model, "reward_model": self.cfg.reward_model, "critic_init": self.cfg.critic_init,
            "layout": self.nets.layout,
        }  # fmt: skip
        for folder in (self.run.path, self.run.final):
            (folder / "ppo_state.json").write_text(json.dumps(state, indent=1))
