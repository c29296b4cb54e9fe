"""`titans-train reproduce`: the paper's orderings in small, in one command (docs/evals.md, "The CPU
reproduction study").

    OMP_NUM_THREADS=1 titans-train reproduce studies/niah-cpu

1. plans the study (a `titans-train study` file: one size, one token budget, a variant per model
   and ablation), every run reading the study corpus at `--corpus`;
2. writes the study corpus (titans_train/eval/study_corpus.py) with as many documents as the
   largest run trains on (each sample seen once), unless it is there already;
3. trains every unfinished run, one after another (the study runner: resumable, a diverged run is
   reported and skipped);
4. evaluates every finished run with `titans-train eval`: `ppl` (loss by position bucket) and
   `mqar` at `--lengths` with the first haystack, `niah` at `--lengths` on each `--haystacks`, each
   haystack's results in `<run>/eval-<haystack>.json` with its length x depth heatmap beside it;
5. writes `<runs_dir>/reproduction.json` (per run: parameters, tokens, status, the niah accuracy
   by haystack and length and the mqar accuracy by length, the loss by position, the niah and mqar
   curves logged during training and the step each first reached `--retrieves-at`, the last memory
   telemetry, the loss of the answer tokens of the validation documents by episode kind), the table
   `<runs_dir>/reproduction.md` (also printed) and `<runs_dir>/reproduction-<haystack>.png`
   (length x run).
Running it again skips finished runs and evaluations; delete a run's eval-*.json to redo it.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

from titans_train.errors import UserError
from titans_train.eval.errors import EvalOptionError

DEFAULT_STUDY = "studies/niah-cpu"
RETRIEVAL_TASKS = ("niah", "mqar")  # their curves during training and first retrieval steps are reported


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("study", nargs="?", default=DEFAULT_STUDY, help=f"a study file (default {DEFAULT_STUDY})")
    parser.add_argument("--runs-dir", help="where the runs go (default: the study's runs_dir)")
    parser.add_argument("--corpus", default="runs/niah-study/corpus", help="the study corpus directory "
                        "(written if missing; default runs/niah-study/corpus)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the corpus (default 0); the eval probes use 0")
    parser.add_argument("--validation-documents", type=int, default=256, help="held-out documents (default 256)")
    parser.add_argument("--lengths", default="1x,2x,4x,8x", help="eval lengths (default 1x,2x,4x,8x)")
    parser.add_argument("--haystacks", default="repeat,natural", help="niah haystacks (default repeat,natural)")
    parser.add_argument("--samples", type=int, default=4,
                        help="probes per niah length and depth, and per mqar length (default 4)")
    parser.add_argument("--retrieves-at", type=float, default=0.5,
                        help="niah/mqar accuracy at 1x that counts as retrieving, for the first-retrieval steps "
                             "(default 0.5)")


def run(args: argparse.Namespace) -> int:
    from titans_train.eval.haystack import HAYSTACKS
    from titans_train.eval.study_corpus import validation_seed, write_study_corpus
    from titans_train.study.plan import plan_study
    from titans_train.study.runner import run_study
    from titans_train.study.spec import load_study

    haystacks = [h.strip() for h in args.haystacks.split(",") if h.strip()]
    unknown = [h for h in haystacks if h not in HAYSTACKS]
    if unknown or not haystacks:
        raise EvalOptionError("--haystacks", f"{', '.join(unknown) or 'nothing'} given; choose from {', '.join(HAYSTACKS)}")
    study, path = load_study(args.study)
    corpus = Path(args.corpus)
    study.overrides.update({"data.train_dir": str(corpus / "train"), "data.validation_dir": str(corpus / "validation")})
    runs = plan_study(study, path, runs_dir=args.runs_dir)
    check_byte_tokenizer(runs, path)
    runs_dir = Path(runs[0].run_dir).parent
    seq_len = runs[0].seq_len
    write_study_corpus(str(corpus), args.seed, math.ceil(max(r.tokens for r in runs) / seq_len),
                       args.validation_documents, seq_len)
    trained = run_study(runs)
    results = []
    for planned in runs:
        result = {"run": planned.name, "variant": planned.variant, "params": planned.params,
                  "tokens": planned.tokens, "steps": planned.steps, "run_dir": planned.run_dir,
                  **training_record(planned, args.retrieves_at)}
        if result["status"] == "finished":
            result.update(evaluate(Path(planned.run_dir), haystacks, args.lengths, args.samples))
            result["answer_loss"] = answer_losses(Path(planned.run_dir), validation_seed(args.seed),
                                                  args.validation_documents, seq_len)
        results.append(result)
    summary = {"study": study.name, "seq_len": seq_len, "lengths": args.lengths, "haystacks": haystacks,
               "samples": args.samples, "runs": results}
    write_outputs(summary, runs_dir)
    evaluated = all(r["status"] == "finished" for r in results)
    return trained if trained else (0 if evaluated else 1)


def check_byte_tokenizer(runs, study_path: Path) -> None:
    """The study corpus is byte-level by construction: its episodes' offsets are byte offsets and
    `answer_losses` encodes documents as bytes, so a run with another tokenizer is refused before
    any corpus is written or run trained."""
    from titans_train.config import InvalidValueError, load_recipe

    for planned in runs:
        tokenizer = load_recipe(planned.recipe, list(planned.overrides), world_size=None).data.tokenizer
        if tokenizer != "byte":
            raise InvalidValueError("data.tokenizer", f"{tokenizer} in run {planned.name} of {study_path}, but the "
                                    "study corpus is byte-level by construction (episode offsets are byte offsets); "
                                    "remove data.tokenizer from the study file and its recipe (or set it to byte)")


def training_record(planned, retrieves_at: float) -> dict:
    """Status, the niah and mqar curves logged during training (`train.eval_tasks`) and the first
    step of each >= retrieves_at, the last validation loss and telemetry."""
    from titans_train.study.collect import read_metrics, run_status

    records = read_metrics(Path(planned.run_dir))
    curves = {task: [(r["step"], r[f"eval/{task}/accuracy"]) for r in records if f"eval/{task}/accuracy" in r]
              for task in RETRIEVAL_TASKS}
    first = {task: next((step for step, accuracy in curve if accuracy >= retrieves_at), None)
             for task, curve in curves.items()}
    telemetry = [r for r in records if any(k.startswith("telemetry/") for k in r)]
    validation = [r["val/loss"] for r in records if "val/loss" in r]
    return {"status": run_status(planned, records), "curves": curves, "first_retrieval_step": first,
            "val_loss": validation[-1] if validation else None,
            "telemetry": {k: v for k, v in telemetry[-1].items() if k.startswith("telemetry/")} if telemetry else {}}


def evaluate(run_dir: Path, haystacks: list[str], lengths: str, samples: int) -> dict:
    """`titans-train eval` per haystack (ppl and mqar with the first); niah by haystack and
    length, mqar by length."""
    niah, mqar, ppl = {}, None, None
    for index, haystack in enumerate(haystacks):
        out = run_dir / f"eval-{haystack}.json"
        if not out.is_file():
            tasks = "ppl,mqar,niah" if index == 0 else "niah"
            command = [sys.executable, "-m", "titans_train", "eval", str(run_dir), "--tasks", tasks,
                       "--lengths", lengths, "--haystack", haystack, "--samples", str(samples), "--out", str(out)]
            code = subprocess.run(command, stdout=subprocess.DEVNULL).returncode
            if code != 0:
                raise UserError(f"evaluating {run_dir} failed (exit code {code}, its error above); fix it and "
                                f"run `titans-train reproduce` again (finished runs and evaluations are kept)")
        tasks = json.loads(out.read_text())["tasks"]
        niah[haystack] = accuracy_by_length(tasks["niah"])
        mqar = accuracy_by_length(tasks["mqar"]) if "mqar" in tasks else mqar
        ppl = tasks.get("ppl", ppl)
    return {"niah": niah, "mqar": mqar, "ppl": ppl}


def answer_losses(run_dir: Path, validation_seed: int, documents: int, seq_len: int) -> dict[str, dict]:
    """Mean loss and greedy accuracy of the answer tokens of the validation documents, by episode
    kind (mqar by level): {"niah": {"loss", "accuracy", "exact", "tokens", "answers"}, "mqar0": ...}.
    `exact`: the fraction of answers whose every token is the greedy choice given the text before
    it, i.e. that greedy decoding would produce whole (the eval's exact match, here on the training
    format). A digit the model cannot copy costs ln 10 = 2.30: the floor of a model that does not
    recall. Runs on this process's device (its CUDA device when CUDA is present)."""
    import torch

    from titans_train.eval.source import load_source
    from titans_train.eval.study_corpus import study_documents
    from titans_train.train.distributed import current_device

    device = current_device()
    model = load_source(run_dir).model.to(device)
    sums: dict[str, list[float]] = {}
    for document in study_documents(validation_seed, documents, seq_len):
        ids = list(document.text.encode("ascii"))
        with torch.no_grad():
            log_probs = torch.log_softmax(model(torch.tensor([ids], device=device)).logits[0].float(), dim=-1).cpu()
        for episode in document.episodes:
            name = episode.kind if episode.level < 0 else f"{episode.kind}{episode.level}"
            total = sums.setdefault(name, [0.0, 0, 0, 0, 0])
            for answer in episode.answers:
                loss, right = answer_scores(log_probs, ids, answer.offset, len(answer.text))
                total[0] += loss
                total[1] += right
                total[2] += len(answer.text)
                total[3] += right == len(answer.text)
                total[4] += 1
    return {name: {"loss": loss / count, "accuracy": right / count, "exact": exact / answers, "tokens": count,
                   "answers": answers}
            for name, (loss, right, count, exact, answers) in sorted(sums.items())}


def answer_scores(log_probs, ids: list[int], offset: int, length: int) -> tuple[float, int]:
    """(summed loss, tokens that are the greedy choice) of the answer at ids[offset:offset + length].
    log_probs: (T, vocab), of one forward over the T ids; the row at position - 1 predicts `position`."""
    loss, right = 0.0, 0
    for position in range(offset, offset + length):
        predicted = log_probs[position - 1]
        loss -= float(predicted[ids[position]])
        right += int(predicted.argmax() == ids[position])
    return loss, right


def accuracy_by_length(task: dict) -> dict[str, float]:
    """Mean exact match of a retrieval task's cells (niah: over depths) by length, weighted by probes:
    {length: accuracy}."""
    totals: dict[int, list[float]] = {}
    for cell in task["cells"]:
        total = totals.setdefault(cell["length"], [0.0, 0])
        total[0] += cell["accuracy"] * cell["probes"]
        total[1] += cell["probes"]
    return {str(length): right / probes for length, (right, probes) in sorted(totals.items())}


def table(summary: dict) -> str:
    runs = summary["runs"]
    lengths = sorted({int(length) for r in runs for acc in r.get("niah", {}).values() for length in acc})
    columns = [f"niah {h[:3]} {length}" for h in summary["haystacks"] for length in lengths]
    columns += [f"mqar {length}" for length in lengths]
    gates = ("theta", "eta", "alpha", "update_norm", "store_gain", "store_gain_shuffled")
    kinds = sorted({kind for r in runs for kind in r.get("answer_loss", {})})
    header = ["run", "params", "tokens", "status", "val loss", *[f"first {task}" for task in RETRIEVAL_TASKS], *columns,
              *[f"answer loss {kind}" for kind in kinds], *gates]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in runs:
        cells = [r["run"], f"{r['params']:,}", f"{r['tokens']:,}", r["status"],
                 f"{r['val_loss']:.3f}" if r["val_loss"] is not None else "-"]
        cells += [str(r["first_retrieval_step"][task]) if r["first_retrieval_step"][task] is not None else "-"
                  for task in RETRIEVAL_TASKS]
        cells += [f"{r['niah'][h][str(length)]:.2f}" if "niah" in r else "-" for h in summary["haystacks"] for length in lengths]
        cells += [f"{r['mqar'][str(length)]:.2f}" if r.get("mqar") else "-" for length in lengths]
        cells += [f"{r['answer_loss'][kind]['loss']:.2f}" if kind in r.get("answer_loss", {}) else "-" for kind in kinds]
        cells += [_layer_mean(r["telemetry"], gate) for gate in gates]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _layer_mean(telemetry: dict, name: str) -> str:
    values = [v for k, v in telemetry.items() if k.endswith(f"/{name}")]
    return f"{sum(values) / len(values):.3g}" if values else "-"


def write_outputs(summary: dict, runs_dir: Path) -> None:
    from titans_train.eval.report import heatmap, write_json
    from titans_train.study.collect import write_atomic

    write_json(summary, runs_dir / "reproduction.json")
    text = table(summary)
    write_atomic(runs_dir / "reproduction.md", text + "\n")
    print(text)
    for haystack in summary["haystacks"]:
        cells = [{"length": int(length), "run": r["run"], "accuracy": accuracy}
                 for r in summary["runs"] if "niah" in r for length, accuracy in r["niah"][haystack].items()]
        if cells:
            heatmap({"cells": cells}, "run", runs_dir / f"reproduction-{haystack}.png",
                    f"niah ({haystack} haystack): exact match by length and run")
