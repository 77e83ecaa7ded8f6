"""FLAT inside a Hugging Face Trainer: `compute_loss` overridden with FLAT's loss on pairs of answers to
the same forget question, the forget answer y_f and a template answer y_e ("I don't know").

Copy this file and flat.py into your project; nothing else of this repository is needed.

    python examples/hf_trainer_flat.py --model MODEL_DIR_OR_HUB_ID --data forget.jsonl --out unlearned/

`--data` is JSON Lines with a "question" and an "answer" per row (TOFU's forget01.jsonl, for one).
tests/test_examples.py runs it on a tiny model and checks its loss against this project's own training
step (train.batch_loss with the flat method).
"""
from __future__ import annotations

import argparse
import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

import flat

STREAMS = ("forget", "template")  # y_f and y_e for the same questions


def encode(tok, question: str, answer: str) -> dict:
    """Prompt and answer tokens; labels are -100 on the prompt, so only the answer is scored."""
    prompt = tok(f"Question: {question}\nAnswer:")["input_ids"]
    ans = tok(" " + answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return {"input_ids": prompt + ans, "labels": [-100] * len(prompt) + ans}


def pair(tok, question: str, answer: str, template: str) -> dict:
    """One training example: the same question answered with y_f and with y_e."""
    return {"forget": encode(tok, question, answer), "template": encode(tok, question, template)}


def collate(examples: list[dict], pad_id: int) -> dict:
    """Left-pad each stream to its longest row: forget_input_ids, forget_attention_mask, forget_labels, ..."""
    batch = {}
    for s in STREAMS:
        rows = [e[s] for e in examples]
        T = max(len(r["input_ids"]) for r in rows)
        pad = [T - len(r["input_ids"]) for r in rows]
        batch[f"{s}_input_ids"] = torch.tensor([[pad_id] * p + r["input_ids"] for p, r in zip(pad, rows)])
        batch[f"{s}_attention_mask"] = torch.tensor([[0] * p + [1] * len(r["input_ids"]) for p, r in zip(pad, rows)])
        batch[f"{s}_labels"] = torch.tensor([[-100] * p + r["labels"] for p, r in zip(pad, rows)])
    return batch


def mean_token_prob(model, inputs: dict, stream: str) -> torch.Tensor:
    """FLAT's P of each row, (B,): the mean probability of the answer's tokens. Positions count from
    each row's first real token, so left padding changes nothing."""
    mask = inputs[f"{stream}_attention_mask"]
    logits = model(input_ids=inputs[f"{stream}_input_ids"], attention_mask=mask,
                   position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    return flat.sequence_stats(logits, inputs[f"{stream}_labels"]).prob_mean


class FLATTrainer(Trainer):
    """A Trainer whose loss is FLAT's (Wang et al., ICLR 2025): L = -(g*(P_e) - f*(g*(P_f))), the mean
    over the batch. Everything else (optimiser, schedule, accumulation, devices) is the Trainer's."""

    def __init__(self, *args, divergence: str = "kl", **kwargs):
        super().__init__(*args, **kwargs)
        self.divergence = divergence

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        p_forget, p_template = mean_token_prob(model, inputs, "forget"), mean_token_prob(model, inputs, "template")
        loss = flat.flat_loss(p_forget=p_forget, p_template=p_template, divergence=self.divergence).mean()
        return (loss, {"p_forget": p_forget, "p_template": p_template}) if return_outputs else loss


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a model directory or Hub id")
    ap.add_argument("--data", required=True, help="JSON Lines with question and answer")
    ap.add_argument("--template", default="I don't know.", help="the template answer y_e")
    ap.add_argument("--divergence", default="kl", help=f"one of {', '.join(flat.DIVERGENCES)}")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--epochs", type=float, default=5)
    ap.add_argument("--max-steps", type=int, default=-1)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    tok = AutoTokenizer.from_pretrained(args.model)
    tok.pad_token = tok.pad_token or tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(args.model)
    with open(args.data, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    train = [pair(tok, r["question"], r["answer"], args.template) for r in rows]
    trainer = FLATTrainer(
        model=model, train_dataset=train, data_collator=lambda ex: collate(ex, tok.pad_token_id),
        divergence=args.divergence,
        args=TrainingArguments(output_dir=args.out, learning_rate=args.lr, num_train_epochs=args.epochs,
                               max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
                               remove_unused_columns=False,  # the forget_* and template_* columns are ours
                               dataloader_pin_memory=torch.cuda.is_available(),
                               save_strategy="no", report_to=[]))
    trainer.train()
    trainer.save_model(args.out)
    tok.save_pretrained(args.out)


if __name__ == "__main__":
    main()
