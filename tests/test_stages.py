"""The Run object's stage protocol: the stage names (and so the caches) of run directories made by
earlier versions of this project are the ones a run makes now, for every runner and kind of stage,
so an old run directory is reused without retraining. A deliberate change of what a key holds
re-records the names, and says so here:
- 0581e0c: recorded (the layout before stages.Run); stages.Run made the same names.
- since then: npo and simnpo keys hold the retain weight only with --npo-retain; a book's stages hold
  its chunks, not its path or --held-out-fraction; a model directory of the user's is keyed by its
  contents (this test names `tiny` by its path, as the recording did: test_faults checks contents)."""
import json

import pytest
from conftest import BOOK_SMOKE, ROOT, make_tiny_model, run_in_process

import corpora
import run_harmful
import run_hp
import run_tofu
import stages

MAINS = {"tofu": run_tofu.main, "hp": run_hp.main, "harmful": run_harmful.main, "hallucination": run_harmful.main}
SKIP = {"config.json", "results.json", "eval_items.json", "tradeoff.png", "curves.png"}


@pytest.fixture(scope="module")
def recorded():
    """Stage names recorded for the tiny model saved at the relative path `tiny` and these command lines."""
    return json.loads((ROOT / "tests" / "fixtures" / "stage_names.json").read_text())


def test_every_stage_name_is_the_one_the_earlier_layout_made(recorded, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    real = stages.model_id
    monkeypatch.setattr(stages, "model_id", lambda p: p if p == "tiny" else real(p))
    make_tiny_model(tmp_path / "tiny", "llama")
    (tmp_path / "book.txt").write_text(corpora.read_text(corpora.HELD_OUT_BOOK)[:20000])
    old_smoke = BOOK_SMOKE[:-2]  # the recording predates --zero-shot (run_hp's default since): off here
    assert recorded["argv"]["hp"][-len(old_smoke):] == old_smoke and BOOK_SMOKE[-2:] == ["--zero-shot", "none"]
    for name, main in MAINS.items():
        out = tmp_path / "runs" / name
        run_in_process(main, ["--model", "tiny", "--out", str(out), *recorded["argv"][name],
                              *(["--zero-shot", "none"] if name == "hp" else [])])
        made = sorted(p.name for p in out.iterdir() if not p.name.startswith(".") and p.name not in SKIP)
        assert made == recorded["stages"][name], name
    # and so a rerun of the old command line reuses every stage: nothing is trained again
    again = run_in_process(run_tofu.main, ["--model", "tiny", "--out", str(tmp_path / "runs" / "tofu"),
                                           *recorded["argv"]["tofu"]])
    assert "[cache] finetune-target: " in again.stdout and "[cache] unlearn-flat:js: " in again.stdout
    assert "[finetune-" not in again.stdout and "[unlearn-" not in again.stdout
