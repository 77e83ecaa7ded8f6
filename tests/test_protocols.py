"""Paper protocols that give trustworthy numbers: MUSE scores only text that was trained on;
continuations stop at EOS; llmu's second answer is a random normal answer; forget quality against
published retain logs; TOFU's prompt strings byte for byte."""
import json
import re
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch
from conftest import TOFU_SMOKE, run_script

import corpora
import data
import evaluate
import models

LOGS = Path(__file__).parent / "fixtures" / "tofu_logs"
RETAIN90 = LOGS / "ft_epoch5_lr1e-05_llama2-7b_retain90_wd0.01"
RETAIN99 = LOGS / "ft_epoch5_lr1e-05_llama2-7b_retain99_wd0.01"


# ---------------------------------------------------------------------------------------------
# MUSE-News: the probes scored lie in the text trained on
# ---------------------------------------------------------------------------------------------

def squash(text):
    return re.sub(r"\s+", "", text)


@pytest.fixture(scope="module")
def muse():
    return corpora.load_muse()


def test_the_paper_preset_trains_on_the_whole_corpus_and_scores_every_probe_in_it(muse):
    full = corpora.muse_forget_set(muse, None, None)
    assert len(full["articles"]) == 889 and len(full["verbmem"]) == 100 and len(full["privleak_forget"]) == 100
    # 71 of KnowMem-forget's 100 answers occur in the forget corpus (whitespace aside); only those are scored
    assert len(full["knowmem_forget"]) == 71


@pytest.mark.parametrize("n_probes,n_priv", [(3, 2), (5, 0), (1, 1)])
def test_the_offline_preset_picks_probes_and_their_articles_together(muse, n_probes, n_priv):
    sel = corpora.muse_forget_set(muse, n_probes, n_priv)
    text = squash(sel["text"])
    assert len(sel["verbmem"]) == n_probes and len(sel["privleak_forget"]) == n_priv == len(sel["privleak_holdout"])
    for p in sel["verbmem"]:                                 # prompt and continuation, both trained on
        assert squash(p["prompt"]) in text and squash(p["gt"]) in text
    assert sel["knowmem_forget"] and all(squash(q["answer"]) in text for q in sel["knowmem_forget"])
    assert all(squash(t) in text for t in sel["privleak_forget"])
    assert not any(squash(t) in squash("\n\n".join(muse["articles"])) for t in sel["privleak_holdout"])


def test_a_probe_whose_article_is_left_out_is_an_error(muse):
    sel = corpora.muse_forget_set(muse, 2, 0)
    probe = sel["verbmem"][0]
    kept = [muse["articles"][i] for i in sel["articles"] if squash(probe["gt"][:200]) not in squash(muse["articles"][i])]
    with pytest.raises(data.DataError, match="VerbMem probe 0 does not lie in the forget text"):
        corpora.check_in_text(sel, squash("\n\n".join(kept)))


def test_a_muse_run_scores_only_what_it_trained_on(tiny_model_dir, tmp_path):
    p = run_script("run_hp.py", "--model", tiny_model_dir, "--corpus", "muse-news", "--out", str(tmp_path / "m"),
                   "--muse-probes", "2", "--privleak-texts", "1", "--max-new-tokens", "4", "--method", "ga",
                   "--max-steps", "1", "--chunk-tokens", "48", "--prompt-tokens", "8", "--eval-chunks", "2",
                   "--ppl-chunks", "2", "--batch-size", "4", "--zero-shot", "none")
    report = json.loads((tmp_path / "m" / "results.json").read_text())
    items = json.loads((tmp_path / "m" / "eval_items.json").read_text())
    sel = corpora.muse_forget_set(corpora.load_muse(), 2, 1)
    for row in ("reference", "original", "ga"):
        r = report[row] if row != "ga" else report["methods"]["ga"]
        assert r["verbmem_items"] == 2 and r["privleak_items"] == 1 and r["knowmem_forget_items"] == len(sel["knowmem_forget"])
        for key in ("verbmem_forget", "knowmem_forget", "knowmem_retain", "privleak", "mia_min_k"):
            assert np.isfinite(r[key]), (row, key)
    trained = squash(sel["text"])
    assert all(squash(t) in trained for t in items["original"]["verbmem"]["truth"])
    assert "all from" in p.stdout and f"{len(sel['articles'])} articles trained on" in p.stdout


# ---------------------------------------------------------------------------------------------
# Continuations stop at EOS, capped at the reference's length
# ---------------------------------------------------------------------------------------------

def test_a_continuation_stops_at_eos_and_at_its_own_cap(tiny_model_dir):
    model, tok = models.load_model(tiny_model_dir, "cpu")
    prompts = [tok("Who wrote the book?").input_ids, tok("The author").input_ids]
    free = evaluate.generate_ids(model, tok, prompts, [6, 3])
    assert [len(g) for g in free] == [6, 3] and tok.eos_token_id not in free[0] + free[1]
    calls = []

    def eos_from_the_third_token(module, inputs, output):  # the model "says" EOS after two tokens
        calls.append(1)
        return output + (len(calls) >= 3) * 1e4 * torch.nn.functional.one_hot(
            torch.tensor(tok.eos_token_id), output.shape[-1])
    handle = model.lm_head.register_forward_hook(eos_from_the_third_token)
    try:
        stopped = evaluate.generate_ids(model, tok, prompts[:1], 6)
    finally:
        handle.remove()
    assert stopped == [free[0][:2]]  # the two tokens before EOS; EOS and nothing after it


# ---------------------------------------------------------------------------------------------
# llmu is Yao et al.'s everywhere: the forget prompt answered with a random normal answer
# ---------------------------------------------------------------------------------------------

def test_llmu_answers_forget_questions_with_retain_answers_never_idk(tofu_run):
    idk = set(data.load_idk())
    retain_answers = {r["answer"] for r in data.first_authors(data.load_tofu("retain99"), 1)}
    templates = [set(a[3]) for a, _ in tofu_run.calls["unlearning_epoch"] if a[3] is not None]
    random_streams = [t for t in templates if t == retain_answers]
    idk_streams = [t for t in templates if t == idk]
    assert len(random_streams) == 1                 # llmu
    assert len(idk_streams) == 3                    # flat, idk, dpo
    assert len(templates) == 4 and not retain_answers & idk


# ---------------------------------------------------------------------------------------------
# Released models and published retain logs
# ---------------------------------------------------------------------------------------------

def test_retain_logs_give_forget_quality_on_the_items_both_sides_hold(tiny_model_dir, tmp_path):
    """TOFU's published Llama-2 retain90 log covers forget10's first 300 items: forget quality is the
    KS test on those, computed here by hand from the log's per-item losses."""
    out = tmp_path / "run"
    run_script("run_tofu.py", "--model", tiny_model_dir, "--split", "forget10", "--target-model", tiny_model_dir,
               "--retain-logs", str(RETAIN90), "--method", "ga", "--out", str(out), *TOFU_SMOKE)
    report = json.loads((out / "results.json").read_text())
    items = json.loads((out / "eval_items.json").read_text())
    log = json.loads((RETAIN90 / "eval_log_forget.json").read_text())
    para = np.array([log["avg_paraphrased_loss"][str(i)] for i in range(300)])
    pert = np.array([np.mean(log["average_perturb_loss"][str(i)]) for i in range(300)])
    retain_tr = np.exp(para - pert)
    for row in ("target", "unlearned"):
        tr = np.array(items[row]["forget"]["truth_ratio"][:300])
        assert report[row]["forget_quality_items"] == 300
        assert report[row]["forget_quality"] == pytest.approx(scipy.stats.ks_2samp(tr, retain_tr).pvalue, rel=1e-9)
    assert len(items["target"]["forget"]["truth_ratio"]) == 400 and "retain" not in items
    assert report["retain"]["forget_quality_items"] == 300


def test_a_retain_log_of_another_split_fails_before_any_model_loads(tmp_path):
    p = run_script("run_tofu.py", "--split", "forget10", "--retain-logs", str(RETAIN99), "--out", str(tmp_path / "x"),
                   check=False)
    assert p.returncode == 2 and "item 0 is not forget10 item 0" in p.stderr and "but its item 360" in p.stderr
    assert not (tmp_path / "x").exists()
    forget01 = data.load_tofu("forget01_perturbed")
    assert evaluate.read_retain_logs(RETAIN99, forget01, "forget01")["n"] == 40


def test_open_unlearning_and_own_logs_are_read_too(tmp_path):
    rows = data.load_tofu("forget01_perturbed")
    tr = list(np.linspace(0.5, 1.5, 40))
    ou = {"forget_truth_ratio": {"agg_value": 0.6, "value_by_index": {str(i): {"score": t} for i, t in enumerate(tr)}},
          "forget_Q_A_ROUGE": {"value_by_index": {str(i): {"input": f"[INST] {r['question']} [/INST]"}
                                                  for i, r in enumerate(rows)}},
          "mia_min_k": {"agg_value": 0.45}}
    (tmp_path / "TOFU_EVAL.json").write_text(json.dumps(ou))
    got = evaluate.read_retain_logs(tmp_path / "TOFU_EVAL.json", rows, "forget01")
    assert got["truth_ratio"] == pytest.approx(tr) and got["mia_min_k"] == 0.45
    own = {"retain": {"forget": {"question": [r["question"] for r in rows], "truth_ratio": tr}}}
    (tmp_path / "eval_items.json").write_text(json.dumps(own))
    assert evaluate.read_retain_logs(tmp_path / "eval_items.json", rows, "forget01")["truth_ratio"] == pytest.approx(tr)
    ou["forget_Q_A_ROUGE"]["value_by_index"]["3"]["input"] = "[INST] another question [/INST]"
    (tmp_path / "TOFU_EVAL.json").write_text(json.dumps(ou))
    with pytest.raises(data.DataError, match="item 3 is not forget01 item 3"):
        evaluate.read_retain_logs(tmp_path / "TOFU_EVAL.json", rows, "forget01")


# ---------------------------------------------------------------------------------------------
# TOFU's prompt strings, byte for byte
# ---------------------------------------------------------------------------------------------

# TOFU's config/model_config.yaml: question_start_tag, question_end_tag, answer_tag per model.
TOFU_TAGS = {"llama2-chat": ("[INST] ", " [/INST]", ""), "base": ("Question: ", "\n", "Answer: ")}


@pytest.mark.parametrize("style", ["llama2-chat", "base"])
def test_prompt_strings_equal_tofus(tiny_model_dir, style):
    _, tok = models.load_model(tiny_model_dir, "cpu")
    for row in data.load_tofu("forget01")[:5]:
        q, a = row["question"], row["answer"]
        start, end, answer_tag = TOFU_TAGS[style]
        tofu = start + q + end + answer_tag + a
        prompt, answer = data.prompt_and_answer(tok, style, q, a)
        assert prompt + answer == tofu                                 # byte for byte
        assert tofu.startswith(prompt) and prompt.rstrip() == (start + q + end + answer_tag).rstrip()
        enc = data.encode_qa(tok, style, q, a)                         # and the tokens a model sees
        assert enc["input_ids"] == tok(tofu).input_ids + [tok.eos_token_id]
    assert models.MODELS["llama2-7b"].prompt == "llama2-chat" and models.MODELS["phi-1.5"].prompt == "base"
