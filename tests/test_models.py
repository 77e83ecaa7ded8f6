"""Model loading, offline: a tiny model from a config, the embedded SmolLM2 default, clear errors."""
import socket
import time

import pytest
import torch
from conftest import make_tiny_model

import judges
import models
import stages
from errors import ModelLoadError


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_local_directory_loads_on_cpu_in_fp32_and_generates(tmp_path, arch):
    path = make_tiny_model(tmp_path / arch, arch)
    model, tok = models.load_model(path, device="cpu")
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    assert tok.pad_token is not None and model.config.pad_token_id == tok.pad_token_id
    assert not model.is_activation_checkpointing  # off by default on CPU
    enc = tok(["Question: Who wrote the book?"], return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=5, do_sample=False)
    assert out.shape == (1, enc.input_ids.shape[1] + 5)


def test_gradient_checkpointing_where_the_training_model_is_built_and_frozen_copy(tiny_model_dir):
    """Loading never switches checkpointing on; building a model to train does, as the run decided."""
    assert not models.is_checkpointing(models.load_model(tiny_model_dir, device="cpu")[0])
    model, _, _ = stages.training_model(tiny_model_dir, models.Compute("cpu", "fp32", gradient_checkpointing=True))
    assert model.is_activation_checkpointing and model.config.use_cache is False
    assert not models.is_checkpointing(stages.training_model(tiny_model_dir, models.Compute("cpu", "fp32", False))[0])
    ref = models.frozen_copy(model)
    assert not ref.training and not any(p.requires_grad for p in ref.parameters())
    assert all(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        next(model.parameters()).add_(1.0)  # the copy does not share storage
    assert not torch.equal(next(model.parameters()), next(ref.parameters()))


def test_unknown_model_name_lists_the_aliases():
    with pytest.raises(ModelLoadError, match="unknown model 'gpt-17'.*llama2-7b, opt-1.3b, opt-2.7b"):
        models.load_model("gpt-17")


@pytest.fixture
def no_network(monkeypatch):
    """Every name lookup the process makes, refused and recorded: offline, nothing may even try."""
    tried = []

    def refuse(host, *args, **kwargs):
        tried.append(host)
        raise OSError(f"no network in this test ({host})")
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(models, "hub_reachable", lambda timeout=3.0: False)
    return tried


def test_unreachable_hub_fails_at_once_with_a_clear_message(no_network):
    # transformers 5, given a Hub id with local_files_only, asked the Hub for an adapter file and retried
    # for 23 s before this error; now nothing tries the network
    with pytest.raises(ModelLoadError) as err:
        models.load_model("flat-unlearning-tests/no-such-model", device="cpu")
    msg = str(err.value)
    assert "'flat-unlearning-tests/no-such-model'" in msg and "unreachable" in msg and "--model DIR" in msg
    with pytest.raises(ModelLoadError, match="config of 'flat-unlearning-tests/no-such-model'.*unreachable"):
        models.model_config("flat-unlearning-tests/no-such-model")
    assert no_network == []


def test_a_hub_id_in_the_local_cache_loads_offline_without_the_network(tmp_path, monkeypatch, no_network):
    """The Hugging Face cache's layout (models--org--name/refs/main and snapshots/<commit>/), filled
    with a tiny model: the Hub id loads from it, with the weights it holds, and nothing asks the Hub."""
    from huggingface_hub import constants
    repo = tmp_path / "hub" / "models--flat-unlearning-tests--tiny"
    commit = "0123456789abcdef0123456789abcdef01234567"
    make_tiny_model(repo / "snapshots" / commit, "llama")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    models.check_name("flat-unlearning-tests/tiny")
    model, tok = models.load_model("flat-unlearning-tests/tiny", device="cpu")
    local, _ = models.load_model(str(repo / "snapshots" / commit), device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), local.state_dict().values()))
    assert models.model_config("flat-unlearning-tests/tiny").hidden_size == model.config.hidden_size
    # the judges load Hub ids the same way: an embedding model, and a classifier (this one loads, then is
    # refused for its labels, which name no harmful class)
    assert judges.SimilarityJudge("flat-unlearning-tests/tiny").model.config.hidden_size == model.config.hidden_size
    with pytest.raises(ModelLoadError, match="none of its labels"):
        judges.ClassifierJudge("flat-unlearning-tests/tiny", "cpu", False)
    assert no_network == []


def test_hub_probe_answers_quickly():
    start = time.time()
    models.hub_reachable(timeout=2.0)
    assert time.time() - start < 10


def test_prompt_style_by_alias_and_by_tokenizer(tiny_model_dir):
    _, tok = models.load_model(tiny_model_dir, device="cpu")
    assert models.prompt_style("opt-2.7b", tok) == "base"
    assert models.prompt_style("llama2-7b", tok) == "llama2-chat"
    assert models.prompt_style("smollm2-135m", tok) == "chat-template"
    assert models.prompt_style(tiny_model_dir, tok) == "base"


def test_embedded_smollm2_converts_once_then_loads_fast_and_answers(tmp_path, monkeypatch):
    monkeypatch.setenv("FLAT_CACHE_DIR", str(tmp_path))
    model, tok = models.load_model("smollm2-135m", device="cpu")
    assert (tmp_path / "smollm2-135m-instruct" / "model.safetensors").exists()
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**enc, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
    model.save_pretrained(tmp_path / "saved")  # a plain model: saving works
    start = time.time()
    again, _ = models.load_model("smollm2-135m", device="cpu")
    assert time.time() - start < 15
    assert torch.equal(again.lm_head.weight, model.lm_head.weight)


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_answer_logits_on_a_padded_batch_equal_full_forwards_of_each_row(tmp_path, arch):
    """Left padding + logits for the scored positions only: same statistics and gradients as
    running each row alone, unpadded, with logits everywhere."""
    import data
    import flat
    model, tok = models.load_model(make_tiny_model(tmp_path / arch, arch), device="cpu")
    rows = [data.encode_qa(tok, "base", q, a) for q, a in [("Who wrote the book?", "The author wrote it in 1990."),
                                                          ("Who?", "Nobody."), ("Where is Paris?", "In France.")]]
    stats = flat.sequence_stats(*models.answer_logits(model, data.collate(rows, tok.pad_token_id)))
    stats.logp_sum.sum().backward()
    fast_grad = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    slow = []
    for r in rows:
        ids, labels = torch.tensor([r["input_ids"]]), torch.tensor([r["labels"]])
        s = flat.sequence_stats(model(input_ids=ids).logits, labels)
        s.logp_sum.sum().backward()
        slow.append(s.logp_sum)
    torch.testing.assert_close(stats.logp_sum.detach(), torch.cat(slow).detach(), atol=1e-5, rtol=1e-5)
    for g, p in zip(fast_grad, model.parameters()):
        torch.testing.assert_close(g, p.grad, atol=1e-5, rtol=1e-4)
