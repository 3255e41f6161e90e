"""The chat dataset file: every line read and checked before any job starts (no torch here).

A line is `{"messages": [{"role": ..., "content": ...}, ...]}` with at least one non-empty assistant
turn. A bad line is reported as PATH:LINE: why; a binary or non-UTF-8 file is reported the same
way, never as a UnicodeDecodeError. The job reads the file through the same function.
"""

from __future__ import annotations

import codecs
import json
from pathlib import Path

ROLES = ("system", "user", "assistant")
MAX_REPORTED_ERRORS = 10
# No tokenizer the harness meets makes a token of more than 64 characters of chat text, so a sample
# longer than max_seq_len * 64 characters is too long for any of them: caught here, before a job
# spends minutes tokenising it only to drop it.
MAX_CHARS_PER_TOKEN = 64
BINARY_HINT = ": is it a binary file? Give a JSONL file of chat samples"


class DatasetError(ValueError):
    """A dataset file has malformed lines; the message lists them as PATH:LINE: why."""


def load_chat_dataset(path: str | Path) -> list[list[dict]]:
    """Read a JSONL file of {"messages": [{role, content}, ...]}; every line is checked first."""
    return [messages for _, messages in read_chat_lines(path)]


def read_chat_lines(path: str | Path) -> list[tuple[int, list[dict]]]:
    """(line number, messages) of every sample, in file order; every line is checked first."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"{path}: no such file")
    if path.is_dir():
        raise DatasetError(f"{path}: is a folder, expected a JSONL file")
    conversations, errors, binary = [], [], False
    with path.open("rb") as handle:  # bytes: a binary file is a line error, not a traceback
        for line_number, raw in enumerate(handle, start=1):
            if line_number == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)  # editors on Windows start UTF-8 files with one
            messages, why = _parse_raw_line(raw)
            if why:
                errors.append(f"{path}:{line_number}: {why}")
                binary = binary or why.endswith(BINARY_HINT)
                if binary and len(errors) >= MAX_REPORTED_ERRORS:
                    break  # a binary file: the first lines say enough
            elif messages is not None:
                conversations.append((line_number, messages))
    if errors:
        raise DatasetError(_error_summary(errors, stopped_early=binary and len(errors) >= MAX_REPORTED_ERRORS))
    if not conversations:
        raise DatasetError(f"{path}: no samples")
    return conversations


def _parse_raw_line(raw: bytes) -> tuple[list[dict] | None, str | None]:
    """(messages, None) for a valid line, (None, None) for a blank one, else (None, why)."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        return None, f"not UTF-8 text (byte 0x{raw[error.start]:02x} at column {error.start + 1}){BINARY_HINT}"
    if "\x00" in line:
        return None, f"holds NUL bytes{BINARY_HINT}"
    if not line.strip():
        return None, None  # blank lines (a trailing newline) are not samples
    return _parse_line(line)


def _error_summary(errors: list[str], stopped_early: bool = False) -> str:
    shown = errors[:MAX_REPORTED_ERRORS]
    more = len(errors) - len(shown)
    count = f"{len(errors)} or more" if stopped_early else str(len(errors))
    header = f"{count} malformed line(s) in the dataset:"
    return "\n".join([header, *shown] + ([f"... and {more} more"] if more else []))


def _parse_line(line: str) -> tuple[list[dict] | None, str | None]:
    """(messages, None) for a valid line, else (None, why)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        return None, f"not valid JSON ({error.msg} at column {error.colno})"
    if not isinstance(record, dict) or "messages" not in record:
        return None, 'no "messages" field (expected {"messages": [{"role": ..., "content": ...}, ...]})'
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        return None, '"messages" must be a non-empty list of {"role", "content"} objects'
    for index, message in enumerate(messages):
        why = _message_problem(message)
        if why:
            return None, f"message {index}: {why}"
    if not any(message["role"] == "assistant" for message in messages):
        return None, "no assistant turn: nothing to train on"
    return [{"role": m["role"], "content": m["content"]} for m in messages], None


def _message_problem(message) -> str | None:
    if not isinstance(message, dict):
        return f"expected an object with role and content, got {type(message).__name__}"
    role = message.get("role")
    if role not in ROLES:
        return f"unknown role {role!r} (expected one of {', '.join(ROLES)})"
    content = message.get("content")
    if not isinstance(content, str):
        return f"{role} content must be a string, got {type(content).__name__}"
    if role == "assistant" and not content.strip():
        return "empty assistant turn"
    return None


def conversation_chars(messages: list[dict]) -> int:
    return sum(len(message["content"]) for message in messages)


def certainly_too_long(conversations: list[list[dict]], max_seq_len: int) -> int:
    """How many samples cannot fit max_seq_len tokens with any tokenizer (see MAX_CHARS_PER_TOKEN)."""
    limit = max_seq_len * MAX_CHARS_PER_TOKEN
    return sum(1 for messages in conversations if conversation_chars(messages) > limit)
