"""Zero-shot utility the way FLAT measures it (Wang et al. 2025, copyright tables): accuracy through
lm-evaluation-harness on boolq, rte, hellaswag, winogrande, arc_challenge, arc_easy, openbookqa, piqa
and truthfulqa, zero-shot, batch 8, on the model already in memory (lm-eval's HFLM wraps it; no
second load, no subprocess).

Each task is lm-eval's own definition, read from the YAML file lm-eval ships (prompt, choices,
target, metrics acc and acc_norm), with one change: where the data comes from. The split lm-eval
evaluates is read from the vendored copy (vendored/zeroshot, sources and licences in its README) or
from --zero-shot-data, and converted to the fields of the Hub dataset lm-eval would load. A task
without a local copy (hellaswag; rte, not vendored because its licence is unstated) is lm-eval's
stock task, loaded from the Hub.

    tasks = zeroshot.resolve("all", data_dir=None)             # before any model loads: files, sha256, rows
    scores = zeroshot.zero_shot(model, tok, tasks, limit=100)  # {"summary": {...}, "items": {...}}
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import logging
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch

import data
import estimate
import models
import tables
from errors import DataError, UsageError

TASK_DIR = data.ROOT / "vendored" / "zeroshot"
BATCH_SIZE = 8  # FLAT's lm-eval batch size


# ---------------------------------------------------------------------------------------------
# Each task's upstream file(s) -> the rows of the Hub dataset lm-eval loads (same field names)
# ---------------------------------------------------------------------------------------------

def _need(row: dict, fields: dict[str, type], where: str) -> dict:
    for key, typ in fields.items():
        if not isinstance(row.get(key), typ):
            raise DataError(f"{where}: field {key!r} missing or not a {typ.__name__}")
    return row


def _lettered(row: dict, stem_key: str, where: str) -> dict:
    """ARC and OpenBookQA as released ({question: {stem, choices: [{text, label}]}, answerKey}) -> the
    Hub's {question | question_stem, choices: {text: [...], label: [...]}, answerKey}."""
    q = _need(row, {"id": str, "question": dict, "answerKey": str}, where)["question"]
    choices = _need(q, {"stem": str, "choices": list}, where)["choices"]
    for c in choices:
        _need(c, {"text": str, "label": str}, where)
    labels = [c["label"] for c in choices]
    if row["answerKey"].strip() not in labels:
        raise DataError(f"{where}: answerKey {row['answerKey']!r} is not one of the labels {labels}")
    return {"id": row["id"], stem_key: q["stem"], "choices": {"text": [c["text"] for c in choices], "label": labels},
            "answerKey": row["answerKey"]}


def boolq_rows(files: list[list[dict]], where: list[str]) -> list[dict]:
    """SuperGLUE BoolQ (the passage starts with the page title and ' -- '); label "true"/"false" -> 1/0,
    the Hub's ClassLabel (lm-eval's choices are ["no", "yes"])."""
    out = []
    for i, r in enumerate(files[0], 1):
        _need(r, {"question": str, "passage": str}, f"{where[0]}: row {i}")
        label = {"false": 0, "true": 1, False: 0, True: 1}.get(r.get("label"))
        if label is None:
            raise DataError(f"{where[0]}: row {i}: label {r.get('label')!r} is not true or false")
        out.append({"question": r["question"], "passage": r["passage"], "idx": r.get("idx", i - 1), "label": label})
    return out


def rte_rows(files, where):
    """GLUE RTE: label 0 = entailment ("True"), 1 = not_entailment ("False")."""
    for i, r in enumerate(files[0], 1):
        _need(r, {"sentence1": str, "sentence2": str, "label": int}, f"{where[0]}: row {i}")
        if r["label"] not in (0, 1):
            raise DataError(f"{where[0]}: row {i}: label {r['label']!r} is not 0 or 1")
    return files[0]


def winogrande_rows(files, where):
    for i, r in enumerate(files[0], 1):
        _need(r, {"sentence": str, "option1": str, "option2": str, "answer": str}, f"{where[0]}: row {i}")
        if r["answer"] not in ("1", "2") or r["sentence"].count("_") != 1:
            raise DataError(f"{where[0]}: row {i}: needs answer '1' or '2' and one '_' in the sentence")
    return files[0]


def arc_rows(files, where):
    return [_lettered(r, "question", f"{where[0]}: row {i}") for i, r in enumerate(files[0], 1)]


def openbookqa_rows(files, where):
    return [_lettered(r, "question_stem", f"{where[0]}: row {i}") for i, r in enumerate(files[0], 1)]


def piqa_rows(files, where):
    """PIQA as released: the questions, and their labels line by line in a second file."""
    rows, labels = files
    if len(rows) != len(labels):
        raise DataError(f"{where[1]}: {len(labels)} labels for the {len(rows)} rows of {where[0]}")
    for i, (r, label) in enumerate(zip(rows, labels), 1):
        _need(r, {"goal": str, "sol1": str, "sol2": str}, f"{where[0]}: row {i}")
        if label not in ("0", "1"):
            raise DataError(f"{where[1]}:{i}: label {label!r} is not 0 or 1")
    return [{"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": int(label)}
            for r, label in zip(rows, labels)]


def truthfulqa_rows(files, where):
    """TruthfulQA's mc_task (v0, the file the Hub dataset pins): {answer: 1 or 0} in file order ->
    {choices: [...], labels: [...]}, the order the Hub's loader keeps (the true answer first in mc1)."""
    out = []
    for i, r in enumerate(files[0], 1):
        _need(r, {"question": str, "mc1_targets": dict, "mc2_targets": dict}, f"{where[0]}: row {i}")
        row = {"question": r["question"]}
        for key in ("mc1_targets", "mc2_targets"):
            targets = r[key]
            if not targets or any(v not in (0, 1) for v in targets.values()) or 1 not in targets.values():
                raise DataError(f"{where[0]}: row {i}: {key} must map answers to 0/1 with at least one 1")
            row[key] = {"choices": list(targets), "labels": list(targets.values())}
        if row["mc1_targets"]["labels"][0] != 1:
            raise DataError(f"{where[0]}: row {i}: mc1_targets must list the true answer first")
        out.append(row)
    return out


class Local(NamedTuple):
    """A task read from local files: lm-eval's YAML (under lm_eval/tasks), the split it evaluates,
    the files (folder/name and the sha256 of the release recorded in vendored/zeroshot/README.md) and
    their conversion to the Hub dataset's rows."""
    yaml: str
    split: str
    files: tuple[tuple[str, str], ...]
    rows: Callable[[list, list], list[dict]]


TASKS = {
    "boolq": Local("super_glue/boolq/default.yaml", "validation", (
        ("boolq/val.jsonl", "21acbfbd1e7908fddd9e626bc2a6101c5a5430bda3fbf74985b979af7a63b989"),), boolq_rows),
    "rte": Local("glue/rte/default.yaml", "validation", (
        ("rte/validation.jsonl", "9f0f73768b89a5f932419851a8ed2bfe7bcef098c0f5f36a40ba9aac579e6669"),), rte_rows),
    "winogrande": Local("winogrande/default.yaml", "validation", (
        ("winogrande/dev.jsonl", "1aeac79cf46a3dcbe59a71ca7e5372a1490cde2b4ae2387dc56f00378104d2e8"),),
        winogrande_rows),
    "arc_challenge": Local("arc/arc_challenge.yaml", "test", (
        ("arc_challenge/ARC-Challenge-Test.jsonl", "9fa8ffb3e3a1f88cb302d53dd95aae81e39209ad9bcf974376b319d8fd35717c"),),
        arc_rows),
    "arc_easy": Local("arc/arc_easy.yaml", "test", (
        ("arc_easy/ARC-Easy-Test.jsonl", "ce32a0774b4beb1977d2c6b16dda5dd2b24fdc9c7f506882c452678676bd09be"),), arc_rows),
    "openbookqa": Local("openbookqa/openbookqa.yaml", "test", (
        ("openbookqa/test.jsonl", "feb2bd9bfa6161dca4c44ce90e51e8cdada83eb5061407fcdc5005e44aaf2313"),),
        openbookqa_rows),
    "piqa": Local("piqa/piqa.yaml", "validation", (
        ("piqa/valid.jsonl", "93503cc97c679e459b065c3d13e848282e44b2a25213985bed3e5d458abef72d"),
        ("piqa/valid-labels.lst", "b4192dc3a2a0363d9d60ccf79800cbbe2f32ebb17726efdde6970e0b8131bceb")), piqa_rows),
    "truthfulqa_mc1": Local("truthfulqa/truthfulqa_mc1.yaml", "validation", (
        ("truthfulqa/mc_task.jsonl", "7c8cd26d5ed79704a8659b6b11d4fb64a26020649b141f6f91af20a296cc84f7"),),
        truthfulqa_rows),
    "truthfulqa_mc2": Local("truthfulqa/truthfulqa_mc2.yaml", "validation", (
        ("truthfulqa/mc_task.jsonl", "7c8cd26d5ed79704a8659b6b11d4fb64a26020649b141f6f91af20a296cc84f7"),),
        truthfulqa_rows),
}
# FLAT's nine tasks; truthfulqa is scored as lm-eval's mc1 and mc2 (its generative variant is not an accuracy).
FLAT_TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_challenge", "arc_easy", "openbookqa", "piqa",
              "truthfulqa_mc1", "truthfulqa_mc2")


class Task(NamedTuple):
    """A resolved task: its lm-eval config (a dict, its data in `rows`) or, for a stock task, its name;
    and what a stage key needs to know about it (the files' sha256 and the YAML's)."""
    name: str
    config: dict | str
    about: dict
    rows: tuple = ()  # a local task's documents (for estimate: how many requests it makes)


# ---------------------------------------------------------------------------------------------
# Resolving --zero-shot before any model loads
# ---------------------------------------------------------------------------------------------

_RESOLVED: dict = {}


def resolve(spec: str, data_dir: str | None = None) -> list[Task]:
    """--zero-shot as tasks: 'none', 'all' (FLAT's tasks that have local files) or a comma-separated
    list. Every local file is checked (present, the recorded sha256, every row parsed and converted)
    here, before any model loads; a task without local files must be an lm-eval task and the Hub
    reachable. Results are kept, so a runner's evaluation reuses the rows read here."""
    if spec == "none":
        return []
    if (spec, data_dir) in _RESOLVED:
        return _RESOLVED[(spec, data_dir)]
    if importlib.util.find_spec("lm_eval") is None:
        raise UsageError("--zero-shot needs lm-evaluation-harness: pip install -r requirements.txt")
    dirs = [Path(data_dir)] if data_dir else []
    if data_dir and not dirs[0].is_dir():
        raise UsageError(f"--zero-shot-data {data_dir}: not a directory")
    dirs.append(TASK_DIR)
    local = lambda name: name in TASKS and all(any((d / f).exists() for d in dirs) for f, _ in TASKS[name].files)  # noqa: E731
    names = [n for n in FLAT_TASKS if local(n)] if spec == "all" else [s.strip() for s in spec.split(",")]
    if len(set(names)) != len(names) or not all(names):
        raise UsageError(f"--zero-shot {spec!r}: a task named twice, or an empty name")
    tasks = [_local_task(n, dirs) if local(n) else _stock_task(n, data_dir) for n in names]
    _RESOLVED[(spec, data_dir)] = tasks
    return tasks


def _local_task(name: str, dirs: list[Path]) -> Task:
    import lm_eval  # optional and heavy: with --zero-shot only
    from lm_eval.tasks._yaml_loader import load_yaml
    t = TASKS[name]
    paths = [next(d / f for d in dirs if (d / f).exists()) for f, _ in t.files]
    for path, (_, recorded) in zip(paths, t.files):
        got = hashlib.sha256(data.check_file(path).read_bytes()).hexdigest()
        if got != recorded:
            raise DataError(f"{path}: sha256 {got[:16]}... differs from the recorded release ({recorded[:16]}...); "
                            f"lm-eval's published numbers are for that file (vendored/zeroshot/README.md)")
    files = [data.read_jsonl(p) if p.suffix == ".jsonl" else data.read_lines(p) for p in paths]
    rows = t.rows(files, [str(p) for p in paths])
    yaml = Path(lm_eval.__file__).parent / "tasks" / t.yaml
    config = dict(load_yaml(str(yaml), resolve_func=True))   # lm-eval's prompt, choices, target and metrics
    config.update(task=name, dataset_path=str(paths[0].parent), dataset_name=None, dataset_kwargs=None,
                  custom_dataset=_dataset(t.split, rows),  # the only change: the data, from these rows
                  training_split=None, validation_split=None, test_split=None, fewshot_split=None)
    config[f"{t.split}_split"] = t.split
    about = {"files": {str(f): s for f, s in t.files}, "yaml_sha256": hashlib.sha256(yaml.read_bytes()).hexdigest(),
             "rows": len(rows), "lm_eval": lm_eval.__version__}
    return Task(name, config, about, tuple(rows))


# lm-eval makes one log-likelihood request per answer choice of a document: (its context, that choice).
_CHOICE_LIST = lambda r: r["choices"]["text"]  # noqa: E731
REQUESTS = {"boolq": lambda r: (r["passage"] + r["question"], ["no", "yes"]),
            "rte": lambda r: (r["sentence1"] + r["sentence2"], ["True", "False"]),
            "winogrande": lambda r: (r["sentence"], [r["option1"], r["option2"]]),
            "arc_challenge": lambda r: (r["question"], _CHOICE_LIST(r)),
            "arc_easy": lambda r: (r["question"], _CHOICE_LIST(r)),
            "openbookqa": lambda r: (r["question_stem"], _CHOICE_LIST(r)),
            "piqa": lambda r: (r["goal"], [r["sol1"], r["sol2"]]),
            "truthfulqa_mc1": lambda r: (r["question"], r["mc1_targets"]["choices"]),
            "truthfulqa_mc2": lambda r: (r["question"], r["mc2_targets"]["choices"])}


def requests(tasks: list[Task], limit: int | None) -> tuple[int, int, list[str]]:
    """What a model's zero-shot evaluation asks of it: (log-likelihood requests, characters of their
    contexts and continuations, and the names of stock tasks, whose documents are not here to count)."""
    n = chars = 0
    for t in tasks:
        for r in t.rows[:limit or None]:
            context, choices = REQUESTS[t.name](r)
            n += len(choices)
            chars += sum(len(context) + len(c) for c in choices)
    return n, chars, [t.name for t in tasks if not t.rows]


def plan(run, paths: dict, later: int = 0) -> list:
    """The zero-shot phase of a run's plan (estimate.say_plan): a stage per model of `paths` and per model
    decided during the run (`later`), each its requests at about 4 characters a token; [] without --zero-shot."""
    args = run.args
    tasks = resolve(args.zero_shot, args.zero_shot_data)
    if not tasks:
        return []
    n, chars, _ = requests(tasks, args.zero_shot_limit)
    scored = [stage for name, p in paths.items() if p for stage in stages(run, name, p)]
    each = dict(forward=chars / 4, share="lm-eval", fixed_s=n * estimate.PER_REQUEST_S)
    return [estimate.Phase(f"zero-shot ({n} requests per model)",
                           [estimate.Stage(p, **each) for p in scored]
                           + [estimate.Stage(estimate.LATER, **each) for _ in range(later)],
                           "--zero-shot-limit N")]


def _dataset(split: str, rows: list[dict]):
    def load(**_):  # lm-eval passes the task's metadata; the data is already here
        import datasets  # optional: the Hub's copy only
        return datasets.DatasetDict({split: datasets.Dataset.from_list(rows)})
    return load


def _stock_task(name: str, data_dir: str | None) -> Task:
    import lm_eval  # optional and heavy: with --zero-shot only
    where = f"{data_dir} or {TASK_DIR}" if data_dir else str(TASK_DIR)
    if name not in _task_manager(stock=True).all_tasks:
        raise UsageError(f"--zero-shot: unknown task {name!r}; local tasks: {', '.join(TASKS)}; "
                         f"or any lm-eval task name (lm-eval ls tasks)")
    if not models.hub_reachable():
        raise UsageError(f"--zero-shot {name}: no local files in {where} and the Hugging Face Hub is unreachable "
                         f"to load lm-eval's stock task; local tasks: {', '.join(TASKS)}"
                         + (" (rte: pass --zero-shot-data DIR with rte/validation.jsonl)" if name == "rte" else ""))
    return Task(name, name, {"stock": name, "lm_eval": lm_eval.__version__})


_MANAGERS: dict = {}


def _task_manager(stock: bool):
    """lm-eval's task index: the full one (about 6 s to build) only when a stock task is named."""
    from lm_eval.tasks import TaskManager  # optional and heavy: with --zero-shot only
    if stock not in _MANAGERS:
        _MANAGERS[stock] = TaskManager(include_defaults=stock)
    return _MANAGERS[stock]


def key(tasks: list[Task]) -> dict:
    """What a zero-shot stage's output depends on besides the model and --zero-shot-limit."""
    return {t.name: t.about for t in tasks}


# ---------------------------------------------------------------------------------------------
# Scoring a model
# ---------------------------------------------------------------------------------------------

def zero_shot(model, tok, tasks: list[Task], limit: int | None = None) -> dict:
    """lm-eval's accuracy of `model` on `tasks` (the first `limit` items of each; None or 0: all), zero-shot,
    batch 8, no chat template (lm-eval's default, as in FLAT). Returns {"summary": {zeroshot_TASK (acc),
    zeroshot_TASK_norm (acc_norm, where lm-eval reports it), zeroshot_TASK_items, zeroshot_mean (of acc)},
    "items": {TASK: {doc_id, target, loglikelihoods (one per choice, summed over the continuation's
    tokens), acc}}}."""
    import lm_eval  # optional and heavy: with --zero-shot only
    from lm_eval.models.huggingface import HFLM
    with _quiet():
        lm = HFLM(pretrained=model, tokenizer=tok, batch_size=BATCH_SIZE)
        out = lm_eval.simple_evaluate(
            model=lm, tasks=[t.config for t in tasks], limit=limit or None, log_samples=True, bootstrap_iters=0,
            task_manager=_task_manager(stock=any(isinstance(t.config, str) for t in tasks)),
            random_seed=None, numpy_random_seed=None, torch_random_seed=None, fewshot_random_seed=None)
    return scores(out, [t.name for t in tasks])


def scores(out: dict, names: list[str]) -> dict:
    """lm-eval's simple_evaluate output as {"summary", "items"}: per task its acc as zeroshot_TASK, acc_norm
    as zeroshot_TASK_norm, any other metric (a stock task's, e.g. wikitext's word_perplexity) as
    zeroshot_TASK_METRIC, and zeroshot_TASK_items; zeroshot_mean over the tasks that report acc. Items:
    per task, each document's id, target, per-choice log-likelihoods (multiple choice) and metrics."""
    summary, items = {}, {}
    for name in names:
        metrics = {k.split(",")[0]: float(v) for k, v in out["results"][name].items()
                   if k.endswith(",none") and "_stderr" not in k and isinstance(v, (int, float))}
        for m, v in metrics.items():
            summary[f"zeroshot_{name}" if m == "acc" else f"zeroshot_{name}_{'norm' if m == 'acc_norm' else m}"] = v
        samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
        summary[f"zeroshot_{name}_items"] = len(samples)
        items[name] = {"doc_id": [s["doc_id"] for s in samples], "target": [s["target"] for s in samples],
                       **{m: [float(s[m]) for s in samples] for m in metrics
                          if samples and isinstance(samples[0].get(m), (int, float))}}
        if samples and all(isinstance(r, (list, tuple)) and isinstance(r[0], (list, tuple)) for r in samples[0]["resps"]):
            items[name]["loglikelihoods"] = [[float(resp[0][0]) for resp in s["resps"]] for s in samples]
    accs = [summary[f"zeroshot_{n}"] for n in names if f"zeroshot_{n}" in summary]
    if accs:
        summary["zeroshot_mean"] = float(np.mean(accs))
    return {"summary": summary, "items": items}


@contextmanager
def _quiet():
    """lm-eval logs, at WARNING, notes meant for its own command line (an in-memory model "may ignore
    model arguments", --limit "is for testing", how to pass metadata to a custom dataset) that a user
    of this project cannot act on; its errors still show, and its progress bars."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


# ---------------------------------------------------------------------------------------------
# In a runner: every evaluated model, each a cached stage
# ---------------------------------------------------------------------------------------------

def stages(run, name: str, model) -> list:
    """The zero-shot stage of a model (none without --zero-shot): keyed by the model, the tasks' files
    and YAML and --zero-shot-limit."""
    tasks = resolve(run.args.zero_shot, run.args.zero_shot_data)
    return [run.stage("zeroshot", name, model=model, tasks=key(tasks))] if tasks else []


def add_zero_shot(run, results: dict[str, dict], paths: dict) -> None:
    """--zero-shot on every model the runner evaluated (results: name -> {"summary", "items"}; paths:
    name -> its directory or name): each a cached stage keyed by the model, the tasks' files and YAML
    and --zero-shot-limit; the scores go into the model's summary and items."""
    args, c = run.args, run.compute
    tasks = resolve(args.zero_shot, args.zero_shot_data)
    for name in results if tasks else ():
        cache, = stages(run, name, paths[name])
        if run.missing(cache):
            run.say(f"[zero-shot] {name}: {', '.join(t.name for t in tasks)}"
                    + (f", the first {args.zero_shot_limit} items of each" if args.zero_shot_limit else ""))
            model, tok = models.load_model(str(paths[name]), c.device, c.eval_dtype,
                                           trust_remote_code=args.trust_remote_code)
            run.write(cache, zero_shot(model, tok, tasks, args.zero_shot_limit))
        scores = run.read(cache)
        results[name]["summary"].update(scores["summary"])
        results[name]["items"]["zeroshot"] = scores["items"]


COLUMN = ("zero-shot", "zeroshot_mean", ".3f")  # the column each runner's table shows when --zero-shot ran


def print_table(report: dict, refs: tuple[str, ...]) -> None:
    """The zero-shot table (after a runner's own): each model's accuracy per task (lm-eval's acc; a stock
    task's other metrics as they come) and the mean accuracy; nothing when --zero-shot did not run."""
    first = next((report[n] for n in refs if n in report), None) or next(iter(report["methods"].values()))
    keys = [k for k in first if k.startswith("zeroshot_") and not k.endswith(("_norm", "_items", "_mean"))]
    if keys:
        items = ", ".join(f"{k[9:-6]} {first[k]}" for k in first if k.startswith("zeroshot_") and k.endswith("_items"))
        tables.print_table(f"Zero-shot accuracy (lm-evaluation-harness acc, 0-1; items per task: {items})", report,
                           refs, [(k[9:], k, ".3f") for k in keys] + [("mean", "zeroshot_mean", ".3f")])


def main(argv=None) -> dict:
    """Score one model on the zero-shot tasks, one task at a time with its time, as a markdown table:

        python zeroshot.py --model smollm2-135m --zero-shot all --zero-shot-data DIR   # DIR: e.g. with rte/
    """
    p = argparse.ArgumentParser(description="Zero-shot accuracy of one model (lm-evaluation-harness, FLAT's tasks)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--zero-shot", default="all")
    p.add_argument("--zero-shot-limit", type=int, default=0)
    p.add_argument("--zero-shot-data", default=None)
    p.add_argument("--trust-remote-code", action="store_true")
    args = p.parse_args(argv)
    tasks = resolve(args.zero_shot, args.zero_shot_data)
    models.check_name(args.model, args.trust_remote_code)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok = models.load_model(args.model, device, torch.bfloat16 if device == "cuda" else torch.float32,
                                   trust_remote_code=args.trust_remote_code)
    print("| task | items | acc | acc_norm | seconds |\n|---|---|---|---|---|")
    out = {}
    for t in tasks:
        start = time.time()
        s = zero_shot(model, tok, [t], args.zero_shot_limit)["summary"]
        out[t.name] = {**s, "seconds": round(time.time() - start, 1)}
        norm = s.get(f"zeroshot_{t.name}_norm")
        print(f"| {t.name} | {s[f'zeroshot_{t.name}_items']} | {s[f'zeroshot_{t.name}']:.4f} | "
              f"{'-' if norm is None else format(norm, '.4f')} | {out[t.name]['seconds']} |", flush=True)
    print(f"| mean | | {np.mean([s[f'zeroshot_{n}'] for n, s in out.items()]):.4f} | | "
          f"{sum(s['seconds'] for s in out.values()):.0f} |")
    return out


if __name__ == "__main__":
    main()
