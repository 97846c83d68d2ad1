"""Benchmark peer: lm-evaluation-harness on local files, for `eval_parity.py`.

Runs inside `.venv-peer` (infra/install-peer.sh), never inside the main `.venv`, and imports
nothing from raycompress. Writes lm-eval task YAMLs that point lm-eval's own prompts and metrics
(piqa, pubmedqa, wikitext) at local JSONL files (`dataset_path: json`), then runs each task with
`lm_eval.simple_evaluate` on the HF backend, CPU, float32, loading the model per task.

    .venv-peer/bin/python jobs/benchmarks/_lm_eval_peer.py --model DIR --workdir TMP \
        --piqa FILE --pubmedqa FILE --wikitext-pages FILE --limit piqa=200 --limit pubmedqa=100

Prints ONE JSON line on stdout: {task: {"metrics": {name: value}, "stderr": {...}, "n", "wall_s"}}
(`wall_s` times `simple_evaluate`, model load included). lm-eval's log goes to stderr.
"""
from __future__ import annotations

import os

# Nothing may download from a hub; set before transformers / datasets / lm_eval import.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

HEADER = """task: {task}
dataset_path: json
dataset_kwargs: {{data_files: {{{split}: "{path}"}}}}
output_type: {output_type}
{split}_split: {split}
"""
ACC = "  - {metric: acc, aggregation: mean, higher_is_better: true}\n"
# (lm-eval task name, split, output type, the rest of lm-eval's own task YAML). lm-eval's pubmedqa
# reads CONTEXTS (a list) and QUESTION; the local file holds the joined `context`, `question` and
# the `label` (yes / no / maybe) — the same prompt otherwise.
TASKS = {
    "piqa": ("piqa_local", "validation", "multiple_choice",
             'doc_to_text: "Question: {{goal}}\\nAnswer:"\ndoc_to_target: label\ndoc_to_choice: "{{[sol1, sol2]}}"\n'
             "metric_list:\n" + ACC + "  - {metric: acc_norm, aggregation: mean, higher_is_better: true}\n"),
    "pubmedqa": ("pubmedqa_local", "test", "multiple_choice",
                 'doc_to_text: "Abstract: {{context}}\\nQuestion: {{question}}\\nAnswer:"\ndoc_to_target: label\n'
                 'doc_to_choice: ["yes", "no", "maybe"]\nmetric_list:\n' + ACC),
    "wikitext2": ("wikitext_local", "test", "loglikelihood_rolling",
                  'doc_to_text: ""\ndoc_to_target: !function preprocess_wikitext.wikitext_detokenizer\n'
                  "process_results: !function preprocess_wikitext.process_results\nmetric_list:\n"
                  "  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n"),
}
# lm-eval's default MMLU task (lm_eval/tasks/mmlu/default) on the local dev / test files.
MMLU = """task: mmlu_local
dataset_path: json
dataset_kwargs: {data_files: {test: "@TEST@", dev: "@DEV@"}}
output_type: multiple_choice
test_split: test
fewshot_split: dev
fewshot_config: {sampler: first_n}
num_fewshot: 5
description: "The following are multiple choice questions (with answers) about @SUBJECT@.\\n\\n"
doc_to_text: "{{question.strip()}}\\nA. {{choices[0]}}\\nB. {{choices[1]}}\\nC. {{choices[2]}}\\nD. {{choices[3]}}\\nAnswer:"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: answer
metric_list:
""" + ACC
SHIM = "from lm_eval.tasks.wikitext.preprocess_wikitext import process_results, wikitext_detokenizer  # noqa: F401\n"


def write_tasks(workdir: Path, files: dict[str, str]) -> dict[str, str]:
    """Our task name -> lm-eval task name, with the YAMLs written into `workdir`."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "preprocess_wikitext.py").write_text(SHIM)
    names = {}
    for ours, (lm_name, split, output_type, body) in TASKS.items():
        if files.get(ours):
            head = HEADER.format(task=lm_name, split=split, path=Path(files[ours]).resolve(), output_type=output_type)
            (workdir / f"{lm_name}.yaml").write_text(head + body)
            names[ours] = lm_name
    if files.get("mmlu_dir") and files.get("mmlu_subject"):
        d, subject = Path(files["mmlu_dir"]).resolve(), files["mmlu_subject"]
        text = MMLU.replace("@TEST@", str(d / f"{subject}_test.jsonl")).replace("@DEV@", str(d / f"{subject}_dev.jsonl"))
        (workdir / "mmlu_local.yaml").write_text(text.replace("@SUBJECT@", subject.replace("_", " ")))
        names[f"mmlu_{subject}"] = "mmlu_local"
    return names


def run_task(model: str, lm_name: str, limit: int | None, batch_size: str, manager) -> dict:
    import lm_eval

    t0 = time.perf_counter()
    out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={model},dtype=float32", tasks=[lm_name],
                                  limit=limit, batch_size=batch_size, device="cpu", task_manager=manager,
                                  log_samples=False)
    wall = time.perf_counter() - t0
    res = out["results"][lm_name]
    metrics = {k.split(",")[0]: v for k, v in res.items() if "," in k and "_stderr" not in k}
    stderr = {k.split("_stderr")[0]: v for k, v in res.items() if "_stderr" in k and isinstance(v, float)}
    return {"metrics": metrics, "stderr": stderr, "n": out["n-samples"][lm_name]["effective"], "wall_s": wall}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--piqa")
    ap.add_argument("--pubmedqa")
    ap.add_argument("--wikitext-pages", help="JSONL of {'page': article}, the documents to score")
    ap.add_argument("--mmlu-dir", help="folder of <subject>_dev.jsonl / <subject>_test.jsonl")
    ap.add_argument("--mmlu-subject", help="one MMLU subject, 5-shot (lm-eval's default MMLU prompt)")
    ap.add_argument("--limit", action="append", default=[], help="task=N: score the first N items")
    ap.add_argument("--batch-size", default="8")
    args = ap.parse_args()
    from lm_eval.tasks import TaskManager

    names = write_tasks(Path(args.workdir), {"piqa": args.piqa, "pubmedqa": args.pubmedqa, "wikitext2": args.wikitext_pages,
                                             "mmlu_dir": args.mmlu_dir, "mmlu_subject": args.mmlu_subject})
    limits = {k: int(v) for k, v in (x.split("=") for x in args.limit)}
    manager = TaskManager(include_path=str(Path(args.workdir).resolve()))
    out = {ours: run_task(args.model, lm, limits.get(ours), args.batch_size, manager) for ours, lm in names.items()}
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
