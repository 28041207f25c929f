"""The data files a setting names (conversations, preference pairs, prompts, labelled text), checked
before they are read. Torch-free: the readers call these, and `kiln.cli` calls them before importing
a verb (and torch), so a missing file is the same one line, at once."""

from __future__ import annotations

from pathlib import Path

from kiln.errors import KilnError

# classify.input values that are built-in tasks, not files
STDLIB_TASKS = ("stdlib-order", "stdlib-packages")


def _existing_file(spec: str | Path, key: str, give: str) -> Path:
    path = Path(spec)
    if not path.is_file():
        raise KilnError(f"{key} '{spec}' does not exist; give {give}")
    return path


def check_conversations(spec: str | Path, key: str = "sft.data") -> Path:
    """A JSONL file of conversations (`kiln.data.chat_data.read_conversations`)."""
    return _existing_file(spec, key, 'a JSONL file of {"messages": [...]} or {"prompt", "completion"} records')


def check_pairs(spec: str | Path, key: str = "preference.data") -> Path:
    """A JSONL file of preference pairs (`kiln.data.preference_data.read_pairs`)."""
    return _existing_file(spec, key, 'a JSONL file of {"prompt": ..., "chosen": ..., "rejected": ...} rows')


def check_prompts(spec: str | Path, key: str = "rl.prompts") -> Path:
    """A JSONL file of prompts for GRPO (`kiln.workloads.rl.read_prompt_rows`)."""
    return _existing_file(spec, key, 'a JSONL file of {"prompt": ...} rows')


def check_label_prompts(spec: str | Path, key: str = "label.prompts") -> Path:
    """The prompts `kiln label generate` samples pairs for (`kiln.serve.label.cli.read_prompts`)."""
    return _existing_file(spec, key, 'a .jsonl ("prompt" field) or text file (one prompt a line)')


def check_classify_input(spec: str, key: str = "classify.input") -> None:
    """A built-in task (`STDLIB_TASKS`) or a JSONL file of labelled text (`kiln.data.labelled_text`)."""
    if spec not in STDLIB_TASKS and not Path(spec).is_file():
        raise KilnError(f"{key} '{spec}' is neither a JSONL file nor one of {', '.join(STDLIB_TASKS)}")
