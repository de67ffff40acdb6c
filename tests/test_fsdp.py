"""FSDP2 through accelerate (configs/accelerate/fsdp2.yaml) with 2 CPU processes (gloo) and a tiny Llama.

A sharded update equals the single-process update on the same global batch (2 processes x batch 2 = 1 x
batch 4), for SFT and the reward model, full and LoRA; checkpoints are distributed (one shard file per
process) and a run killed with SIGKILL resumes from them to the uninterrupted run's weights; the final
model is saved whole and loads with `from_pretrained`.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import torch
from accelerate.utils import DistributedType
from conftest import WORDS
from safetensors.torch import load_file
from test_reward import write_synthetic

from rlhfkit.distributed import even_batches, even_share
from rlhfkit.reward import load_reward_model

REPO = Path(__file__).resolve().parents[1]
FSDP2 = REPO / "configs" / "accelerate" / "fsdp2.yaml"
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
LORA = ["--lora.enabled", "true", "--lora.r", "4", "--lora.alpha", "8"]


def sft_args(model_dir: Path, data: Path, **extra) -> list[str]:
    fields = dict(model=model_dir, data=data, max_steps=8, eval_every=4, checkpoint_every=2, precision="fp32",
                  learning_rate=3e-3, max_length=64, grad_accum=2)  # fmt: skip
    fields.update(extra)
    return [a for k, v in fields.items() for a in (f"--{k}", str(v))]


def single(step: str, out: Path, args: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "rlhfkit.cli", step, "--output_dir", str(out), "--batch_size", "4", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, check=True)


def fsdp2(step: str, out: Path, args: list[str]) -> list[str]:
    """The 2-process FSDP2 command: half the batch per process, the same global batch."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP2), "--num_processes", "2",
            "-m", "rlhfkit.cli", step, "--output_dir", str(out), "--batch_size", "2", *args]  # fmt: skip


def run_fsdp2(step: str, out: Path, args: list[str]) -> None:
    proc = subprocess.run(fsdp2(step, out, args), capture_output=True, text=True, env=ENV)
    assert proc.returncode == 0, proc.stderr[-4000:]


def assert_same_weights(a: dict, b: dict, **tol) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k, **tol)


@pytest.fixture(scope="module")
def demos(tmp_path_factory) -> Path:
    rng = random.Random(1)
    path = tmp_path_factory.mktemp("fsdp-data") / "demos.jsonl"
    with path.open("w") as f:
        for i in range(60):
            prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
            f.write(json.dumps({"prompt": f"{prompt} {i}", "response": " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 10)))}) + "\n")
    return path


@pytest.fixture(scope="module")
def sft_full(tiny_model_dir, demos, tmp_path_factory) -> SimpleNamespace:
    """One single-process and one uninterrupted FSDP2 SFT run (full fine-tuning), shared by the tests below."""
    tmp = tmp_path_factory.mktemp("fsdp-sft")
    args = sft_args(tiny_model_dir, demos)
    single("sft", tmp / "one", args)
    run_fsdp2("sft", tmp / "two", args)
    return SimpleNamespace(one=tmp / "one", two=tmp / "two", args=args)


def test_fsdp2_sft_equals_single_process_with_sharded_checkpoints_and_a_whole_final_model(sft_full):
    from transformers import AutoModelForCausalLM

    one, two = (load_file(str(run / "final" / "model.safetensors")) for run in (sft_full.one, sft_full.two))
    assert_same_weights(one, two, rtol=1e-4, atol=1e-5)  # the reduction sums in another order
    # The same losses, step by step (the eval runs on both processes' shares, padded to equal forward passes).
    losses = [[(m["step"], m["phase"], m["loss"]) for m in map(json.loads, (run / "metrics.jsonl").open())] for run in (sft_full.one, sft_full.two)]
    assert [s[:2] for s in losses[0]] == [s[:2] for s in losses[1]]
    assert [s[2] for s in losses[1]] == pytest.approx([s[2] for s in losses[0]], rel=1e-5)
    # Checkpoints are a distributed checkpoint: one shard file per process for the model and the optimiser.
    ckpt = sft_full.two / "checkpoints" / "step-0000008"
    for part in ("pytorch_model_fsdp_0", "optimizer_0"):
        assert sorted(p.name for p in (ckpt / part).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not list(ckpt.glob("*.safetensors"))  # no whole copy of the weights in a checkpoint
    # The final model is whole: from_pretrained loads it, with every weight at its full shape.
    model = AutoModelForCausalLM.from_pretrained(sft_full.two / "final")
    for name, p in model.state_dict().items():
        assert p.shape == one[name].shape if name in one else name == "lm_head.weight"  # tied to the embeddings


@pytest.mark.slow
def test_fsdp2_run_killed_with_sigkill_resumes_to_the_uninterrupted_weights(sft_full, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen(fsdp2("sft", out, sft_full.args), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    deadline = time.time() + 240
    while not list((out / "checkpoints").glob("step-*/trainer_state.json")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    # SIGKILL to the launcher and both workers, mid-run (torchrun starts its workers in their own sessions).
    for p in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
        p.send_signal(signal.SIGKILL)
    proc.wait()
    psutil.wait_procs(psutil.Process().children(recursive=True), timeout=10)
    assert not (out / "final").exists(), "the run finished before it was killed"
    run_fsdp2("sft", out, sft_full.args)  # the same command again resumes from the sharded checkpoint
    resumed, straight = (load_file(str(run / "final" / "model.safetensors")) for run in (out, sft_full.two))
    assert_same_weights(resumed, straight, rtol=1e-6, atol=1e-7)
    steps = [m["step"] for m in map(json.loads, (out / "metrics.jsonl").open()) if m["phase"] == "train"]
    assert steps == sorted(set(steps))


@pytest.mark.slow
def test_fsdp2_sft_lora_equals_single_process(tiny_model_dir, demos, tmp_path):
    args = sft_args(tiny_model_dir, demos, checkpoint_every=4) + LORA
    single("sft", tmp_path / "one", args)
    run_fsdp2("sft", tmp_path / "two", args)
    one, two = (load_file(str(tmp_path / run / "final" / "model.safetensors")) for run in ("one", "two"))
    assert_same_weights(one, two, rtol=1e-4, atol=1e-5)  # LoRA merged into the base: the whole model saved


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_fsdp2_reward_model_equals_single_process(tiny_model_dir, tmp_path, lora):
    data = write_synthetic(tmp_path / "marker.jsonl", n=64)
    args = ["--model", str(tiny_model_dir), "--data", str(data), "--max_steps", "3", "--eval_every", "2", "--checkpoint_every", "2",
            "--precision", "fp32", "--learning_rate", "3e-3", "--max_length", "64", "--eval_fraction", "0.2", "--grad_accum", "2"]  # fmt: skip
    args += LORA + ["--train_top_layers", "1", "--cache_frozen_features", "true"] if lora else []
    single("reward", tmp_path / "one", args)
    run_fsdp2("reward", tmp_path / "two", args)
    rm1, rm2 = (load_reward_model(tmp_path / run / "final")[0] for run in ("one", "two"))
    assert_same_weights(rm1.state_dict(), rm2.state_dict(), rtol=1e-4, atol=1e-5)
    assert rm2.stats["mean"] == pytest.approx(rm1.stats["mean"], abs=1e-4)  # normalisation measured on the whole model
    assert rm2.stats["eval"]["accuracy"] == pytest.approx(rm1.stats["eval"]["accuracy"])  # eval over both processes' shares


def test_even_batches_give_every_process_as_many_forward_passes():
    """Under FSDP each forward is a collective: 5 items over 2 processes in batches of 2 are 2 batches each."""
    items = list("abcde")
    shares = [even_share(items, SimpleNamespace(distributed_type=DistributedType.FSDP, num_processes=2, process_index=r), batch_size=2) for r in range(2)]
    assert shares == [(["a", "c", "e", "a"], 3), (["b", "d", "a", "a"], 2)]
    ddp = SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, num_processes=2, process_index=1)
    assert even_share(items, ddp, batch_size=2) == (["b", "d"], 2)  # DDP's forward needs no padding
    assert even_batches(ddp, [1], [3, 1], 2, 0) == [1]


def test_fsdp_precision_policy_is_bf16_compute_with_fp32_reduction_and_only_version_2(monkeypatch):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from rlhfkit.distributed import enable_fsdp

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    plugin = SimpleNamespace(fsdp_version=2, mixed_precision_policy=MixedPrecisionPolicy(torch.bfloat16, torch.bfloat16))
    acc = SimpleNamespace(distributed_type=DistributedType.FSDP, state=SimpleNamespace(fsdp_plugin=plugin), num_processes=2)
    enable_fsdp(acc, "bf16")  # accelerate's own bf16 policy reduces in bf16
    assert (plugin.mixed_precision_policy.param_dtype, plugin.mixed_precision_policy.reduce_dtype) == (torch.bfloat16, torch.float32)
    enable_fsdp(acc, "fp32")
    assert plugin.mixed_precision_policy is None
    plugin.fsdp_version = 1
    with pytest.raises(ValueError, match="fsdp_version: 2"):
        enable_fsdp(acc, "fp32")


FROZEN_WORKER = '''
import copy, json, os, sys
import torch, torch.distributed as dist
from accelerate import Accelerator
from transformers import AutoModelForCausalLM
from rlhfkit.distributed import enable_fsdp, gathered, parameter_bytes_per_process, shard_frozen

acc = Accelerator(cpu=True)
enable_fsdp(acc, "fp32")
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
whole = copy.deepcopy(model)
x = torch.tensor([[5, 17, 42, 8, 99, 3]])
sharded = shard_frozen(acc, model)
held = parameter_bytes_per_process(sharded)["frozen"] / sum(p.numel() * 4 for p in whole.parameters())
with torch.no_grad():
    diff = (sharded(x).logits - whole(x).logits).abs().max().item()
gathers, original = [0], dist.all_gather_single
def counting(*a, **k):
    gathers[0] += 1
    return original(*a, **k)
dist.all_gather_single = counting
settings = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
with torch.no_grad():
    with gathered(acc, sharded):
        once = sharded.generate(x, **settings)
    inside, gathers[0] = gathers[0], 0
    per_token = sharded.generate(x, **settings)
    reference = whole.generate(x, **settings)
print("RESULT " + json.dumps({"fsdp": acc.distributed_type == "FSDP", "held": held, "diff": diff, "inside": inside, "outside": gathers[0],
      "same": once.tolist() == per_token.tolist() == reference.tolist()}), flush=True)
'''


def test_a_frozen_network_sharded_gives_the_whole_networks_outputs_and_generation_gathers_once(tiny_model_dir, tmp_path):
    """What step 3 needs: the reference / reward model sharded (half the weights per process, same logits), and
    generation inside `gathered` all-gathers the weights once per call instead of once per token and block."""
    worker = tmp_path / "worker.py"
    worker.write_text(FROZEN_WORKER)
    env = {**ENV, "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(worker), str(tiny_model_dir)],
                          capture_output=True, text=True, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    # Both workers write to one pipe: their lines can run together, so each flat JSON object is found by itself.
    results = [json.loads(found) for found in re.findall(r"RESULT (\{[^{}]*\})", proc.stdout)]
    assert len(results) == 2
    for r in results:
        assert r["fsdp"] and r["same"]
        assert r["held"] == pytest.approx(0.5, abs=0.02)  # each process holds half the weights
        assert r["diff"] < 1e-5
        assert r["outside"] >= 8 * 3  # every token gathers each block (2) and the root again
        assert r["inside"] <= 3  # once per shard unit, for the whole generation
