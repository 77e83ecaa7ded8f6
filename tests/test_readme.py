"""The README's FLAT-KL snippet, as a reader pastes it into another project: it runs on a tiny model,
imports nothing of this project but flat, and its loss is this project's FLAT-KL loss."""
import copy
import re

import torch
from conftest import ROOT

import data
import flat
import methods
import models
import train


def readme_snippet(name: str) -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(rf"<!-- snippet: {name} -->\s*```python\n(.*?)```", text, re.S)
    assert m, f"README.md has no snippet {name!r}"
    return m.group(1)


def test_the_snippet_is_short_and_imports_only_torch_transformers_and_flat():
    code = readme_snippet("flat-kl")
    assert len([l for l in code.splitlines() if l.strip()]) <= 15
    imports = re.findall(r"^(?:import|from) (\w+)", code, re.M)
    assert set(imports) == {"torch", "transformers", "flat"}, imports


def test_the_snippet_trains_with_flat_kl(tiny_model_dir):
    _, tok = models.load_model(tiny_model_dir, "cpu")
    rows = data.load_tofu("forget01")[:3]
    idk = data.load_idk()[:3]
    forget = [data.encode_qa(tok, "base", r["question"], r["answer"]) for r in rows]
    template = [data.encode_qa(tok, "base", r["question"], a) for r, a in zip(rows, idk)]
    batch = {"forget": data.collate(forget, tok.pad_token_id), "template": data.collate(template, tok.pad_token_id)}
    before, _ = models.load_model(tiny_model_dir, "cpu")
    # The same loss through this project's path: one forward over both streams, answer_logits, LOSSES["flat"].
    want, _ = train.batch_loss(before, {"forget": forget, "template": template}, methods.LOSSES["flat"],
                               methods.LossParams(divergence="kl"), tok.pad_token_id)
    scope = {"model_name": tiny_model_dir, "batches": [(batch["forget"], batch["template"])]}
    exec(compile(readme_snippet("flat-kl"), "README.md", "exec"), scope)
    torch.testing.assert_close(scope["loss"].detach(), want.mean().detach(), rtol=1e-5, atol=1e-6)
    # one AdamW step was taken: FLAT-KL raised P_e (the template) on this batch
    p_e = lambda m: flat.sequence_stats(*models.answer_logits(m, batch["template"])).prob_mean.mean()  # noqa: E731
    with torch.no_grad():
        assert p_e(scope["model"]) > p_e(copy.deepcopy(before))


def memory_plan_totals(text: str) -> set[str]:
    """Every 'total' of bench/MEMORY.md's tables (GiB, as printed)."""
    totals = set()
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 14 and re.fullmatch(r"\d+\.\d", cells[11]):
            totals.add(cells[11])
    return totals


def test_every_memory_figure_of_the_readme_is_a_total_of_the_memory_plan():
    """The README quotes the planner, never a one-off plan: each GiB figure of its two memory sections is
    a total in bench/MEMORY.md (`python -m bench --plan-memory`), the file a reader regenerates."""
    totals = memory_plan_totals((ROOT / "bench" / "MEMORY.md").read_text())
    assert len(totals) > 50, "bench/MEMORY.md's table did not parse"
    text = (ROOT / "README.md").read_text()
    sections = re.search(r"## Beyond one device.*?(?=## Performance)", text, re.S).group(0)
    quoted = re.findall(r"(?<![\d.])\d+\.\d(?![\d.]|B)", sections)  # one decimal: GiB (67.05 GiB, 90% of 80 GB, has two)
    assert len(quoted) >= 15, quoted
    assert sorted(set(quoted) - totals) == [], "README figures not in bench/MEMORY.md"
