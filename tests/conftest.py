"""Shared fixtures: a tiny random-weight model with its own byte-level tokenizer, built offline."""
import pytest


def make_tiny_model(out_dir, arch: str = "llama"):
    """Save a tiny causal LM of `arch` ("llama" or "opt") with random weights and a byte-level BPE
    tokenizer trained on a few sentences, so runners and loaders can be tested without the Hub."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM, PreTrainedTokenizerFast

    corpus = ["Question: Who wrote the book? Answer: The author wrote it in 1990.",
              "I don't know the answer to that. The capital of France is Paris.",
              "Basil Mahfouz Al-Kuwaiti writes novels about family and memory."] * 20
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    common = dict(vocab_size=len(tokenizer), bos_token_id=0, eos_token_id=1)
    if arch == "llama":
        config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=4096, **common)
        model = LlamaForCausalLM(config)
    elif arch == "opt":
        config = OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                           word_embed_proj_dim=32, max_position_embeddings=4096, pad_token_id=1, **common)
        model = OPTForCausalLM(config)
    else:
        raise ValueError(arch)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return str(out_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")
