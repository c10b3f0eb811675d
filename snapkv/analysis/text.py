"""Text every Python install has, the standard library's own source and docstrings: the one place that
builds prompts and haystacks from it (observation prompt sets, needle haystacks, and `stdlib_source_ids`:
the speed and recording benchmarks' prompts of any length).

Two prompt sets, regenerated deterministically by `build_prompt_sets` (`snapkv build-data`):

documents.jsonl  one record per module: a document of 2K-7K tokens (the module's source cut at a line
                 boundary to a length drawn with a fixed seed) and 4 questions, each about a different
                 function or class spread along the document ("What does `name` do?"); the reference
                 answer is the first paragraph of its docstring, its depth is where it sits (0 = start).
chat.jsonl       one record per module: 2K-7K tokens of its source as context for a chat request
                 (`chat_request`: "Here is the beginning of Python module X. Continue it."); the
                 reference response is the next `response_tokens` tokens of the real file, fed by
                 teacher forcing like the paper's reference answers.
Every record stores its token count under the embedded model's tokenizer; the build refuses a set
whose lengths fall outside 2K-7K tokens.

Prompt formats, chosen from the tokenizer (`has_chat_template`), never from the model's name: a chat model
gets a one-turn chat (its template, generation prompt added); a base model without a chat template (e.g.
gemma-3-270m) gets the plain format: its special prefix (``<bos>``), the content with the question written
as "Question: ...", then "\nAnswer:" (`chat_parts`, `question_text`, `answer_start`, `chat_ids`).
"""

import ast
import functools
import importlib.util
import json
import random
from collections.abc import Sequence
from pathlib import Path

from snapkv.core.files import atomic_write_text

MODULES = (
    "argparse", "ast", "calendar", "collections", "configparser", "contextlib", "csv", "dataclasses",
    "difflib", "dis", "email.message", "enum", "fractions", "ftplib", "functools", "gettext", "gzip",
    "heapq", "http.client", "imaplib", "inspect", "ipaddress", "logging", "mailbox", "optparse", "pathlib",
    "pickle", "pprint", "queue", "random", "shutil", "smtplib", "statistics", "string", "subprocess",
    "tarfile", "tempfile", "textwrap", "threading", "tokenize", "traceback", "typing", "urllib.parse",
    "uuid", "warnings", "zipfile",
)
# Source prompts (`stdlib_source_ids`): these modules' source, one after the other, in this order.
SOURCE_MODULES = (
    "argparse", "collections", "typing", "inspect", "dataclasses", "pathlib", "functools", "enum",
    "logging", "subprocess", "textwrap", "configparser", "email.message", "json.decoder", "ast",
    "tarfile", "zipfile", "unittest.case", "asyncio.base_events", "http.client", "difflib", "pydoc",
)
MIN_TOKENS, MAX_TOKENS = 2000, 7000
QUESTIONS_PER_DOCUMENT = 4
# The plain prompt format (tokenizers without a chat template): "<bos>Question: ...\nAnswer:"
QUESTION_LABEL = "Question: "
ANSWER_HEADER = "\nAnswer:"


def module_source(name: str) -> str:
    return Path(importlib.util.find_spec(name).origin).read_text(encoding="utf-8")


def stdlib_source_ids(tokenizer, length: int, modules: Sequence[str] = SOURCE_MODULES,
                      headers: bool = True) -> list[int]:
    """The first `length` token ids of the source of `modules`, one after the other, each followed by a
    line break and, with `headers`, preceded by a line `# ---- name ----`: a shorter prompt is the start
    of a longer one."""
    text = ""
    for name in modules:
        text += (f"# ---- {name} ----\n" if headers else "") + module_source(name) + "\n"
        if len(text) < 3 * length:  # source code runs at 3.5-4 characters per token: too short yet
            continue
        ids = token_ids(tokenizer, text)
        if len(ids) >= length:
            return ids[:length]
    raise ValueError(f"the source of {len(modules)} modules gives fewer than {length} tokens: "
                     "ask for a shorter prompt or pass more modules")


def cut_to_tokens(text: str, tokenizer, tokens: int) -> str:
    """The longest prefix of `text`, ending at a line break, that has at most `tokens` tokens."""
    ids = tokenizer(text, add_special_tokens=False).input_ids[:tokens]
    prefix = tokenizer.decode(ids)
    return prefix[: prefix.rfind("\n") + 1] if "\n" in prefix else prefix


def documented_definitions(source: str) -> list[dict]:
    """Top-level and method definitions with a docstring, in order: name, line, answer."""
    try:
        tree = ast.parse(source)
    except SyntaxError:  # a cut document may end mid-statement: parse the complete lines only
        lines = source.splitlines(keepends=True)
        while lines:
            lines.pop()
            try:
                tree = ast.parse("".join(lines))
                break
            except SyntaxError:
                continue
        else:
            return []
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
            doc = ast.get_docstring(node)
            if doc and len(doc.split()) >= 6:
                found.append(dict(name=node.name, line=node.lineno, answer=doc.split("\n\n")[0].strip()))
    unique = {d["name"]: d for d in sorted(found, key=lambda d: -d["line"])}  # keep first occurrence
    return sorted(unique.values(), key=lambda d: d["line"])


def spread(items: list, count: int) -> list:
    """`count` items evenly spread along the list, first and last included."""
    if len(items) <= count:
        return items
    return [items[round(i * (len(items) - 1) / (count - 1))] for i in range(count)]


def build_documents(tokenizer, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for name in MODULES:
        target = rng.randint(MIN_TOKENS, MAX_TOKENS)
        text = cut_to_tokens(module_source(name), tokenizer, target)
        definitions = documented_definitions(text)
        tokens = len(tokenizer(text, add_special_tokens=False).input_ids)
        if len(definitions) < QUESTIONS_PER_DOCUMENT or tokens < MIN_TOKENS:
            continue
        lines = text.count("\n") or 1
        questions = [
            dict(question=f"What does `{d['name']}` do?", answer=d["answer"], name=d["name"],
                 depth=round(d["line"] / lines, 3))
            for d in spread(definitions, QUESTIONS_PER_DOCUMENT)
        ]
        records.append(dict(id=f"doc-{name}", module=name, tokens=tokens, text=text, questions=questions))
    return records


def build_chat(tokenizer, seed: int = 1, response_tokens: int = 512) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for name in MODULES:
        source = module_source(name)
        ids = tokenizer(source, add_special_tokens=False).input_ids
        target = rng.randint(MIN_TOKENS, MAX_TOKENS)
        if len(ids) < target + response_tokens:
            continue
        context = cut_to_tokens(source, tokenizer, target)
        rest = tokenizer(source[len(context):], add_special_tokens=False).input_ids[:response_tokens]
        records.append(dict(id=f"chat-{name}", module=name, context=context, response=tokenizer.decode(rest),
                            context_tokens=len(tokenizer(context, add_special_tokens=False).input_ids)))
    return records


def chat_request(record: dict, tokenizer=None, max_context_tokens: int | None = None) -> str:
    """The user message of a chat record, its context optionally cut to `max_context_tokens`; for a tokenizer
    without a chat template it is written as a question (`question_text`)."""
    context = record["context"]
    if max_context_tokens is not None:
        context = cut_to_tokens(context, tokenizer, max_context_tokens)
    request = (f"Here is the beginning of the Python module `{record['module']}`:\n\n{context}\n"
               "Continue the module from where it stops.")
    return request if tokenizer is None else question_text(tokenizer, request)


def chat_ids(tokenizer, content: str) -> list[int]:
    """Token ids of a one-turn prompt: the model's chat template with the generation prompt added, or,
    without a chat template, the plain format (special prefix + content + "\nAnswer:")."""
    if not has_chat_template(tokenizer):
        return special_prefix_ids(tokenizer) + token_ids(tokenizer, content + ANSWER_HEADER)
    text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False).input_ids


def build_prompt_sets(tokenizer, out_dir="data") -> dict[str, Path]:
    """Write documents.jsonl and chat.jsonl under out_dir (atomically); returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, records in (("documents", build_documents(tokenizer)), ("chat", build_chat(tokenizer))):
        lengths = [r.get("tokens", r.get("context_tokens")) for r in records]
        if not records or not all(MIN_TOKENS <= n <= MAX_TOKENS for n in lengths):
            raise RuntimeError(f"{name}: {len(records)} records with token lengths {lengths}, "
                               f"expected {MIN_TOKENS}-{MAX_TOKENS} each")
        path = out / f"{name}.jsonl"
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        paths[name] = path
    return paths


def load_prompt_set(name: str, data_dir="data") -> list[dict]:
    """Read a prompt set ("documents" or "chat") built by `build_prompt_sets`."""
    if name not in ("documents", "chat"):
        raise ValueError(f"unknown prompt set {name!r}: choose 'documents' or 'chat'")
    path = Path(data_dir) / f"{name}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: build it with `snapkv build-data --out {data_dir}`")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def stdlib_haystack_text(modules: Sequence[str] = MODULES) -> str:
    """Prose from the standard library: every module, class and function docstring of `modules`
    (at least 80 characters), in source order, separated by blank lines."""
    return _docstrings(tuple(modules))


@functools.lru_cache(maxsize=4)
def _docstrings(modules: tuple[str, ...]) -> str:
    parts = []
    for name in modules:
        tree = ast.parse(module_source(name))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 80:
                    parts.append(doc.strip())
    return "\n\n".join(parts)


def load_haystack(path=None) -> str:
    """The text of `path` (any UTF-8 text file), or the standard-library docstrings when None."""
    if path is None:
        return stdlib_haystack_text()
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"haystack file {str(path)!r} does not exist: pass a UTF-8 text file")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise ValueError(f"haystack file {str(path)!r} is empty")
    return text


def token_ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def has_chat_template(tokenizer) -> bool:
    """Whether prompts for this tokenizer are chats (it has a chat template) or plain Question/Answer text."""
    return bool(getattr(tokenizer, "chat_template", None))


def special_prefix_ids(tokenizer) -> list[int]:
    """The ids the tokenizer puts before any text (e.g. ``<bos>``; none for SmolLM2)."""
    bare = token_ids(tokenizer, "a")
    full = list(tokenizer("a").input_ids)
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return full[:start]
    return []


def question_text(tokenizer, question: str) -> str:
    """A question as a prompt's content writes it: as is in a chat, "Question: ..." in the plain format."""
    return question if has_chat_template(tokenizer) else QUESTION_LABEL + question


def answer_start(tokenizer, end: str, answer_prefix: str = "") -> str:
    """The end text of `chat_parts` followed by the start of the answer: joined as is in a chat, with a space
    in the plain format ("Answer: The ...")."""
    space = " " if answer_prefix and not has_chat_template(tokenizer) else ""
    return f"{end}{space}{answer_prefix}"


def chat_parts(tokenizer) -> tuple[list[int], str]:
    """(head ids, end text) of a one-turn prompt: head ids precede the user's content, the end text follows it.

    With a chat template: the template's text before the content and after it (end of turn + assistant
    header). Without one (a base model): the tokenizer's special prefix (e.g. ``<bos>``) and "\nAnswer:"; write
    the content's question with `question_text` and join an answer prefix with `answer_start`."""
    if not has_chat_template(tokenizer):
        return special_prefix_ids(tokenizer), ANSWER_HEADER
    marker = "\u2063SNAPKV\u2063"
    text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False,
                                         add_generation_prompt=True)
    head, found, end = text.partition(marker)
    if not found:
        raise ValueError("the tokenizer's chat template drops the user content: cannot build prompts")
    return token_ids(tokenizer, head), end
