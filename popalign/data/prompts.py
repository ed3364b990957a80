"""Neutral prompts expanded over bias axes into the prompt table every later stage reads.

A neutral prompt is a template with placeholders: ``a photo of a {identity} doctor``. Filling the
slots with nothing gives the neutral prompt ("a photo of a doctor"); filling them with the phrases of
one joint class of the axes gives an augmented prompt ("a photo of a female asian doctor"). Axes are
always crossed. The table is JSONL, one row per prompt: a neutral row, then its augmented rows.
Formats are described in ``docs/prompts.md``.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from popalign import files
from popalign.data.axes import BiasAxis, Intersection
from popalign.errors import UserError

DEFAULT_TEMPLATE = "a photo of a {subject}"
PROMPTS_DIR = Path(__file__).resolve().parent.parent / "prompts"
EVAL_ONLY = ("generic_eval", "specific_eval")  # shipped sets of full prompts, for evaluation only
IDENTITY = "identity"
ROW_KEYS = ("prompt_id", "neutral_id", "kind", "neutral", "prompt", "classes", "template")
KINDS = ("neutral", "augmented")

_SLOT = re.compile(r"\{([^{}]*)\}")
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]*")  # as popalign.data.images.KEY_RE: ids become tar keys
_MARK = "\x00"  # stands before each filled slot so the article fix touches only slot neighbours
_ARTICLE = re.compile(r"(?<![\w'-])([Aa]n?)\s+\x00[\s\x00]*([^\W\d_][\w'-]*)")
_A_BEFORE = ("eu", "uni", "use", "usu", "uti", "ura", "uro", "one", "once")  # vowel letter, 'y'/'w' sound
_AN_BEFORE = ("hour", "honest", "honor", "honour", "heir")  # silent 'h'


@dataclass(frozen=True)
class NeutralPrompt:
    """A neutral prompt as a template with ``{identity}`` (and axis) slots; ``source`` is file:line."""

    prompt_id: str
    template: str
    source: str = ""


@dataclass(frozen=True)
class PromptRow:
    """One row of the prompt table."""

    prompt_id: str
    neutral_id: str
    kind: str  # "neutral" | "augmented"
    neutral: str
    prompt: str
    classes: dict[str, str] = field(default_factory=dict)  # axis -> class; empty for neutral rows
    template: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _wants_an(word: str) -> bool:
    w = word.lower()
    if w.startswith(_A_BEFORE):
        return False
    return w.startswith(_AN_BEFORE) or (bool(w) and w[0] in "aeiou")


def _fix_article(m: re.Match[str]) -> str:
    article = "an" if _wants_an(m.group(2)) else "a"
    return f"{article.capitalize() if m.group(1)[0] == 'A' else article} {m.group(2)}"


def render(template: str, fills: Mapping[str, str], fix_articles: bool = True) -> str:
    """Fill a template's ``{slot}`` placeholders and normalise whitespace.

    With ``fix_articles`` an "a"/"an" right before a slot is made to agree with the word that ends
    up after it: "a {identity} engineer" -> "an engineer", "an asian engineer", "a female engineer".
    """
    return _finish(_SLOT.sub(lambda m: f" {_MARK}{fills[m.group(1)]} ", template), fix_articles)


def _finish(text: str, fix_articles: bool) -> str:
    """Fix articles before marked slots, drop the marks, normalise whitespace."""
    if fix_articles:
        text = _ARTICLE.sub(_fix_article, text)
    text = " ".join(text.replace(_MARK, " ").split())
    return re.sub(r" ([,.;:!?])", r"\1", text)


def _not_utf8(path: Path, err: UnicodeDecodeError) -> str:
    return f"{path}: not UTF-8 text ({err.reason} at byte {err.start})"


def _numbered_lines(path: Path) -> list[tuple[int, str]]:
    """Non-empty lines with ``#`` comments removed, with their 1-based line numbers."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror or err})") from None
    except UnicodeDecodeError as err:
        raise UserError(_not_utf8(path, err)) from None
    out = [(i, line.split("#", 1)[0].strip()) for i, line in enumerate(lines, 1)]
    return [(i, text) for i, text in out if text]


def read_lines(path: str | Path) -> list[str]:
    """The non-empty, comment-free lines of a TXT prompt file (e.g. ``generic_eval.txt``)."""
    return [text for _, text in _numbered_lines(Path(path))]


def shipped_prompt_sets() -> list[str]:
    """File names of the prompt sets shipped in ``popalign/prompts/``."""
    return sorted(p.name for p in PROMPTS_DIR.iterdir() if p.suffix in (".txt", ".csv"))


def resolve_prompt_file(name_or_path: str | Path) -> Path:
    """A path, or the name of a shipped set with or without suffix (``occupations_train``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    if path.parent == Path("."):  # a bare name may mean a shipped set
        for candidate in (
            PROMPTS_DIR / path.name,
            PROMPTS_DIR / f"{path.name}.txt",
            PROMPTS_DIR / f"{path.name}.csv",
        ):
            if candidate.is_file():
                return candidate
    raise UserError(f"{path}: prompt file not found (shipped sets: {', '.join(shipped_prompt_sets())})")


class _CsvReader(csv.DictReader):
    """A strict ``DictReader`` (an unclosed quote is an error, not the rest of the file read as one
    field) whose format errors name the file and line."""

    def __init__(self, lines: Any, path: Path) -> None:
        super().__init__(lines, strict=True)
        self.path = path

    def __next__(self) -> dict:
        start = self.line_num + 1  # where the record begins; the count stops short at the error
        try:
            return super().__next__()
        except csv.Error as err:
            raise UserError(f"{self.path}:{start}: not valid CSV ({err}: an unclosed quote?)") from None


def _open_csv(path: Path, required: str = "prompt") -> tuple[_CsvReader, Any]:
    try:
        handle = path.open(newline="", encoding="utf-8-sig")
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror or err})") from None
    reader = _CsvReader(_utf8_lines(handle, path), path)
    try:
        columns = list(reader.fieldnames or [])
    except csv.Error as err:
        handle.close()
        raise UserError(f"{path}:1: not valid CSV ({err})") from None
    except BaseException:
        handle.close()
        raise
    if required not in columns:
        handle.close()
        raise UserError(f"{path}: no '{required}' column (columns: {', '.join(columns) or 'none'})")
    return reader, handle


def _utf8_lines(handle: Any, path: Path) -> Any:
    """The lines of a text handle; a byte that is not UTF-8 is a ``UserError`` naming the file."""
    try:
        yield from handle
    except UnicodeDecodeError as err:
        raise UserError(_not_utf8(path, err)) from None


def read_neutral_prompts(
    path: str | Path, template: str | None = None, fix_articles: bool = True
) -> list[NeutralPrompt]:
    """Read neutral prompts from a CSV (``prompt`` column with ``{identity}``, optional ``prompt_id``)
    or a TXT of subjects (one per line) put into ``template``'s ``{subject}`` (default
    :data:`DEFAULT_TEMPLATE`); ``{subject}`` becomes ``{identity} {subject}`` unless the template
    already places ``{identity}`` (then an "a"/"an" before ``{subject}`` agrees with the subject,
    as in :func:`render`). Ids default to ``p0000``, ``p0001``, ... in file order.
    """
    path = Path(path)
    prompts: list[NeutralPrompt] = []
    if path.suffix.lower() == ".csv":
        if template is not None:
            raise UserError(
                f"{path}: a template applies to a TXT of subjects; CSV prompts carry their own slots"
            )
        reader, handle = _open_csv(path)
        with handle:
            for row in reader:
                where = f"{path}:{reader.line_num}"
                text = " ".join((row.get("prompt") or "").split())
                if not text:
                    raise UserError(f"{where}: empty prompt")
                if not _SLOT.search(text):
                    raise UserError(f"{where}: prompt {text!r} has no {{{IDENTITY}}} placeholder")
                pid = (row.get("prompt_id") or "").strip() or f"p{len(prompts):04d}"
                if not _ID.fullmatch(pid):
                    raise UserError(
                        f"{where}: prompt_id {pid!r}: use letters, digits, '_' and '-' only (it becomes a tar key)"
                    )
                prompts.append(NeutralPrompt(pid, text, where))
    else:
        template = DEFAULT_TEMPLATE if template is None else template
        if "{subject}" not in template:
            raise UserError(f"--template {template!r} has no {{subject}} placeholder")
        if "{identity}" not in template:
            template = template.replace("{subject}", "{identity} {subject}")
        for line_no, subject in _numbered_lines(path):
            if "{" in subject or "}" in subject:
                raise UserError(f"{path}:{line_no}: a subject may not contain braces: {subject!r}")
            text = _finish(template.replace("{subject}", _MARK + subject), fix_articles)
            prompts.append(NeutralPrompt(f"p{len(prompts):04d}", text, f"{path}:{line_no}"))
    if not prompts:
        raise UserError(f"{path}: no prompts in file")
    seen: dict[str, str] = {}
    for p in prompts:
        for key in (p.prompt_id, p.template):
            if key in seen:
                raise UserError(f"{p.source}: {key!r} repeats {seen[key]}")
            seen[key] = p.source
    return prompts


def expand_prompts(
    neutral_prompts: Sequence[NeutralPrompt | str],
    axes: Sequence[BiasAxis] | Intersection,
    fix_articles: bool = True,
) -> list[PromptRow]:
    """One neutral row per prompt followed by one augmented row per joint class of ``axes``.

    Joint classes run row-major over the axes as listed (last fastest); phrases sharing a slot join
    in axis ``order``. Augmented ids are ``<neutral_id>-a0000``, ``-a0001``, ...
    """
    joint = axes if isinstance(axes, Intersection) else Intersection(axes)
    slots: dict[str, list[BiasAxis]] = {IDENTITY: []}
    for axis in sorted(joint.axes, key=lambda a: a.order):  # stable: ties keep the listed order
        slots.setdefault(axis.placeholder, []).append(axis)
    neutral_fills = {s: " ".join(a.neutral for a in members if a.neutral) for s, members in slots.items()}
    rows: list[PromptRow] = []
    made: dict[str, str] = {}  # prompt id -> where its neutral prompt comes from
    for i, item in enumerate(neutral_prompts):
        np_ = item if isinstance(item, NeutralPrompt) else NeutralPrompt(f"p{i:04d}", item, f"prompt {i}")
        used = set(_SLOT.findall(np_.template))
        unknown = sorted(used - set(slots))
        if unknown:
            raise UserError(
                f"{np_.source}: placeholder {{{unknown[0]}}} matches no axis (slots: {', '.join(sorted(slots))})"
            )
        for slot, members in slots.items():
            if members and slot not in used:
                names = ", ".join(a.name for a in members)
                raise UserError(
                    f"{np_.source}: prompt {np_.template!r} has no {{{slot}}} placeholder for axis {names}"
                )
        neutral = render(np_.template, neutral_fills, fix_articles)
        rows.append(PromptRow(np_.prompt_id, np_.prompt_id, "neutral", neutral, neutral, {}, np_.template))
        for j, combo in enumerate(joint.combos):
            classes = dict(zip((a.name for a in joint.axes), combo))
            fills = {
                s: " ".join(p for a in members if (p := a.phrase(classes[a.name])))
                for s, members in slots.items()
            }
            prompt = render(np_.template, fills, fix_articles)
            aug_id = f"{np_.prompt_id}-a{j:04d}"
            rows.append(PromptRow(aug_id, np_.prompt_id, "augmented", neutral, prompt, classes, np_.template))
        for row in rows[len(rows) - 1 - len(joint.combos) :]:
            if row.prompt_id in made:
                raise UserError(
                    f"{np_.source}: prompt_id {row.prompt_id!r} is also the id of a prompt of {made[row.prompt_id]}"
                    " (augmented prompts get <id>-aNNNN): choose another prompt_id"
                )
            made[row.prompt_id] = np_.source
    return rows


def write_prompt_table(rows: Iterable[PromptRow], path: str | Path) -> Path:
    """Write rows as JSONL, via a temporary file renamed into place (readers never see half a file).

    The file gets the usual mode (0666 less the umask, like every other output); ``UserError`` when
    ``path`` is a folder or cannot be written.
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a folder (--out takes the prompt table file to write)")
    files.check_no_file_above(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:  # not mkstemp: that makes the file 0600
            for row in rows:
                f.write(json.dumps(row.to_dict(), ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise UserError(f"{path}: cannot write ({err.strerror or err})") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def read_prompt_table(path: str | Path) -> list[PromptRow]:
    """Read a table written by :func:`write_prompt_table`; ``UserError`` naming file and line."""
    path = Path(path)
    rows: list[PromptRow] = []
    seen: set[str] = set()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise UserError(f"{path}: cannot read prompt table ({err.strerror or err})") from None
    except UnicodeDecodeError as err:
        raise UserError(_not_utf8(path, err)) from None
    for line_no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        try:
            data = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{where}: not valid JSON ({err.msg})") from None
        if not isinstance(data, dict):
            raise UserError(f"{where}: a row must be a JSON object")
        missing = [k for k in ROW_KEYS if k not in data]
        if missing:
            raise UserError(f"{where}: missing key(s) {', '.join(missing)}")
        classes = data["classes"]
        if not all(isinstance(data[k], str) for k in ROW_KEYS if k != "classes") or not (
            isinstance(classes, dict) and all(isinstance(v, str) for v in classes.values())
        ):
            raise UserError(f"{where}: 'classes' must map axis to class and every other value be a string")
        if data["kind"] not in KINDS:
            raise UserError(f"{where}: kind must be one of {KINDS}, got {data['kind']!r}")
        if not _ID.fullmatch(data["prompt_id"]):  # generate would refuse it without naming the table
            raise UserError(
                f"{where}: prompt_id {data['prompt_id']!r}: use letters, digits, '_' and '-' only (it "
                "becomes a tar key)"
            )
        if data["prompt_id"] in seen:
            raise UserError(f"{where}: duplicate prompt_id {data['prompt_id']!r}")
        seen.add(data["prompt_id"])
        rows.append(PromptRow(**{k: data[k] for k in ROW_KEYS}))
    if not rows:
        raise UserError(f"{path}: empty prompt table")
    return rows


def read_specific_prompts(
    path: str | Path, axes: Sequence[BiasAxis] = ()
) -> list[tuple[str, dict[str, str]]]:
    """Identity-specific prompts from a CSV: ``prompt`` plus one column per axis naming its class
    (empty when the prompt does not name that axis). With ``axes``, columns and classes are checked.
    """
    path = Path(path)
    reader, handle = _open_csv(path)
    known = {a.name: a for a in axes}
    columns = [c for c in reader.fieldnames or [] if c not in ("prompt", "prompt_id")]
    if known and set(columns) - set(known):
        handle.close()
        raise UserError(
            f"{path}: column(s) {sorted(set(columns) - set(known))} are not axes ({', '.join(known)})"
        )
    out = []
    with handle:
        for row in reader:
            classes = {c: (row.get(c) or "").strip() for c in columns if (row.get(c) or "").strip()}
            for axis_name, cls in classes.items():
                if known and cls not in known[axis_name].class_names:
                    raise UserError(f"{path}:{reader.line_num}: {cls!r} is not a class of axis {axis_name!r}")
            text = " ".join((row.get("prompt") or "").split())
            if not text:
                raise UserError(f"{path}:{reader.line_num}: empty prompt")
            out.append((text, classes))
    if not out:
        raise UserError(f"{path}: no prompts in file")
    return out
