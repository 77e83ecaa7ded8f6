"""data.py: files, TOFU loading, prompt formats, answer-only labels, padding and batching."""
import hashlib
import random

import pytest

import data
import models
from flat import IGNORE_INDEX


def test_vendored_tofu_matches_its_checksums():
    for line in (data.TOFU_DIR / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split()
        assert hashlib.sha256((data.TOFU_DIR / name).read_bytes()).hexdigest() == digest, name


def test_every_tofu_config_loads_with_its_published_size():
    sizes = {"full": 4000, "forget01": 40, "forget05": 200, "forget10": 400, "retain90": 3600, "retain95": 3800,
             "retain99": 3960, "forget01_perturbed": 40, "forget05_perturbed": 200, "forget10_perturbed": 400,
             "retain_perturbed": 400, "real_authors_perturbed": 100, "world_facts_perturbed": 117}
    for name, n in sizes.items():
        assert len(data.load_tofu(name)) == n, name
    full = data.load_tofu("full")
    for forget, retain in data.SPLITS.items():  # forget sets are the last authors of full
        assert data.load_tofu(retain) + data.load_tofu(forget) == full
    assert all(len(r["perturbed_answer"]) == 5 for r in data.load_tofu("forget01_perturbed"))
    assert len(data.load_idk()) == 100


def test_unknown_config_lists_the_valid_ones():
    with pytest.raises(KeyError, match="unknown TOFU config 'forget02'.*forget01"):
        data.load_tofu("forget02")


def test_malformed_files_name_the_file_and_line(tmp_path):
    bad = tmp_path / "forget01.jsonl"
    bad.write_text('{"question": "q", "answer": "a"}\n{"question": "q2", "answer": \n')
    with pytest.raises(data.DataError, match=r"forget01.jsonl:2: not valid JSON"):
        data.load_tofu("forget01", tmp_path)
    bad.write_text('{"question": "q", "answer": "a"}\n\n{"question": "q3"}\n')
    with pytest.raises(data.DataError, match=r"forget01.jsonl:3: field 'answer' missing"):
        data.load_tofu("forget01", tmp_path)
    with pytest.raises(data.DataError, match=r"retain99.jsonl: file not found"):
        data.load_tofu("retain99", tmp_path)


@pytest.mark.parametrize("style", ["base", "llama2-chat"])
def test_question_tokens_are_masked_and_answer_plus_one_eos_scored(tiny_model_dir, style):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    enc = data.encode_qa(tok, style, "Who wrote the book?", "The author wrote it.")
    ids, labels = enc["input_ids"], enc["labels"]
    scored = [i for i, l in zip(ids, labels) if l != IGNORE_INDEX]
    assert scored[-1] == tok.eos_token_id and scored.count(tok.eos_token_id) == 1
    assert tok.decode(scored[:-1]).strip() == "The author wrote it."
    n_prompt = labels.index(next(l for l in labels if l != IGNORE_INDEX))
    prompt = tok.decode(ids[:n_prompt], skip_special_tokens=True)
    assert prompt == {"base": "Question: Who wrote the book?\nAnswer:",
                      "llama2-chat": "[INST] Who wrote the book? [/INST]"}[style]
    assert ids[:n_prompt] == data.encode_prompt(tok, style, "Who wrote the book?")


def test_chat_template_prompt_for_instruct_models():
    import models
    _, tok = models.load_model("smollm2-135m", device="cpu")
    enc = data.encode_qa(tok, "chat-template", "Who wrote the book?", "Nobody did.")
    text = tok.decode(enc["input_ids"])
    assert text.endswith("<|im_start|>user\nWho wrote the book?<|im_end|>\n<|im_start|>assistant\nNobody did.<|im_end|>")
    scored = [i for i, l in zip(enc["input_ids"], enc["labels"]) if l != IGNORE_INDEX]
    assert tok.decode(scored) == "Nobody did.<|im_end|>"


def test_collate_pads_to_the_longest_row_of_the_batch():
    rows = [{"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]}, {"input_ids": [5, 6], "labels": [IGNORE_INDEX, 6]}]
    b = data.collate(rows, pad_id=0, side="right")
    assert b["input_ids"].tolist() == [[5, 6, 7], [5, 6, 0]]
    assert b["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [IGNORE_INDEX, 6, IGNORE_INDEX]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    b = data.collate(rows, pad_id=0)  # left, the default
    assert b["input_ids"].tolist() == [[5, 6, 7], [0, 5, 6]]
    assert b["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [IGNORE_INDEX, IGNORE_INDEX, 6]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [0, 1, 1]]
    assert set(data.collate([{"input_ids": [1]}], 0)) == {"input_ids", "attention_mask"}


def test_length_grouped_batches_cover_every_index_once_and_pad_little():
    rng = random.Random(0)
    lengths = [rng.randint(10, 200) for _ in range(1000)]
    batches = data.length_grouped_batches(lengths, 16, random.Random(1))
    assert sorted(i for b in batches for i in b) == list(range(1000))
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    unsorted = [list(range(s, min(s + 16, 1000))) for s in range(0, 1000, 16)]
    padded_unsorted = sum(len(b) * max(lengths[i] for i in b) for b in unsorted)
    assert padded < 0.7 * padded_unsorted


def test_unlearning_batches_pair_each_forget_question_with_a_template_and_a_retain_example(tiny_model_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    forget = data.load_tofu("forget01")
    retain = data.load_tofu("retain99")[:60]
    idk = data.load_idk()
    batches = data.unlearning_epoch(tok, "base", forget, idk, retain, 8, random.Random(0))
    assert sum(len(b["forget"]) for b in batches) == len(forget)
    for b in batches:
        assert len(b["forget"]) == len(b["template"]) == len(b["retain"])
        for f, t in zip(b["forget"], b["template"]):
            n = t["labels"].index(next(l for l in t["labels"] if l != IGNORE_INDEX))
            assert f["input_ids"][:n] == t["input_ids"][:n]  # same question
            answer = tok.decode([i for i, l in zip(t["input_ids"], t["labels"]) if l != IGNORE_INDEX][:-1]).strip()
            assert answer in idk
    again = data.unlearning_epoch(tok, "base", forget, idk, retain, 8, random.Random(0))
    assert again == batches  # the run's seed fixes the draws
    assert "retain" not in data.unlearning_epoch(tok, "base", forget, idk, None, 8, random.Random(0))[0]
    with pytest.raises(data.DataError, match="forget set is empty"):
        data.unlearning_epoch(tok, "base", [], idk, retain, 8, random.Random(0))


def test_the_context_check_reads_the_answers_each_row_has(tiny_model_dir):
    """Plain TOFU rows have no paraphrased or perturbed answers: the check scores what is there (a chat
    style, where an empty answer has no token, once refused every plain row)."""
    _, tok = models.load_model(tiny_model_dir, "cpu")
    rows = data.load_tofu("forget01")[:3] + data.load_tofu("forget01_perturbed")[:3]
    for style in ("base", "llama2-chat"):
        data.check_context(tok, style, rows, data.load_idk()[:5], 4096, 200)
        with pytest.raises(data.DataError, match="the model reads at most 40"):
            data.check_context(tok, style, rows, [], 40, 0)
