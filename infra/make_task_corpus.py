"""Build data/corpora/task_mmlu_dev_qa.jsonl: the MMLU dev questions (5 per subject) written as
MMLU-style multiple-choice prompts with their answers, a "task" corpus for Cus-Prun's task
dimension. Only dev items are used (they are MMLU's few-shot examples, never scored items).

    python infra/make_task_corpus.py [data/eval/mmlu] [data/corpora/task_mmlu_dev_qa.jsonl]
"""
import json
import sys
from pathlib import Path


def render(subject: str, row: dict) -> str:
    lines = [f"The following is a multiple choice question about {subject.replace('_', ' ')}.", "", row["question"]]
    lines += [f"{letter}. {choice}" for letter, choice in zip("ABCD", row["choices"])]
    lines.append(f"Answer: {'ABCD'[int(row['answer'])]}")
    return "\n".join(lines)


def main(src: Path, dst: Path) -> None:
    with open(dst, "w", encoding="utf-8") as out:
        for path in sorted(src.glob("*_dev.jsonl")):
            subject = path.name[: -len("_dev.jsonl")]
            for n, line in enumerate(path.read_text(encoding="utf-8").split("\n")):
                if line.strip():
                    row = json.loads(line)
                    out.write(json.dumps({"id": f"mmlu-dev-{subject}-{n}", "text": render(subject, row),
                                          "source": "mmlu_dev"}) + "\n")


if __name__ == "__main__":
    args = sys.argv[1:]
    main(Path(args[0] if args else "data/eval/mmlu"), Path(args[1] if len(args) > 1 else "data/corpora/task_mmlu_dev_qa.jsonl"))
