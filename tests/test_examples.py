"""examples/hf_trainer_flat.py: FLAT inside a Hugging Face Trainer with flat.py alone. Its loss is this
project's FLAT step on the same batch, one step raises P_e, and its command line trains and saves."""
import json
import sys

import torch
from conftest import ROOT
from transformers import TrainingArguments

import methods
import models
import train

sys.path.insert(0, str(ROOT / "examples"))
import hf_trainer_flat as example  # noqa: E402

QA = [("Who wrote the book?", "The author wrote it in 1990."), ("What is the capital of France?", "Paris."),
      ("What does Basil write?", "Novels about family and memory.")]


def test_the_trainer_loss_is_this_projects_flat_step_and_one_step_raises_p_template(tiny_model_dir, tmp_path):
    model, tok = models.load_model(tiny_model_dir, "cpu")
    pairs = [example.pair(tok, q, a, "I don't know.") for q, a in QA]  # answers of different lengths: padding
    inputs = example.collate(pairs, tok.pad_token_id)
    trainer = example.FLATTrainer(
        model=model, train_dataset=pairs, data_collator=lambda ex: example.collate(ex, tok.pad_token_id),
        divergence="kl", args=TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-2, max_steps=1,
                                                per_device_train_batch_size=len(pairs), remove_unused_columns=False,
                                                save_strategy="no", report_to=[], use_cpu=True))
    loss, out = trainer.compute_loss(model, inputs, return_outputs=True)
    # this project's path: both streams in one forward pass, answer_logits, the method table's flat
    want, diag = train.batch_loss(model, {s: [p[s] for p in pairs] for s in example.STREAMS}, methods.LOSSES["flat"],
                                  methods.LossParams(divergence="kl"), tok.pad_token_id)
    assert abs(loss.item() - want.mean().item()) < 1e-5, (loss.item(), want.mean().item())
    assert torch.allclose(out["p_template"], diag["p_template"], atol=1e-5)
    trainer.train()
    with torch.no_grad():
        after = example.mean_token_prob(model, inputs, "template")
    assert (after > out["p_template"].detach()).all(), (out["p_template"], after)


def test_the_example_command_line_trains_and_saves(tiny_model_dir, tmp_path):
    rows = tmp_path / "forget.jsonl"
    rows.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in QA))
    example.main(["--model", tiny_model_dir, "--data", str(rows), "--max-steps", "1", "--batch-size", "3",
                  "--lr", "1e-3", "--out", str(tmp_path / "out")])
    saved, _ = models.load_model(str(tmp_path / "out"), "cpu")
    base, _ = models.load_model(tiny_model_dir, "cpu")
    assert not torch.equal(next(saved.parameters()), next(base.parameters()))  # it trained, and saved that
