r"""Math answer checking: extract the final answer from a completion, normalise it, compare it with the gold one.

Extraction, first that applies (`extract_answer`):
    1. the last complete `\boxed{...}` (or `\fbox{...}`), nested braces allowed
    2. the last GSM8K-style `#### <answer>` line
    3. the last "the (final) answer is <answer>"
    4. the last number in the text

Equivalence (`answers_match`): equal after `normalize_answer` (spacing, `$`, `\$`, `%`, thousands separators,
trailing `.0`, units, `\text{}`, `\left`/`\right`, `\dfrac`); else, when both sides are plain numbers
(integers, decimals, fractions), exact rational equality; else math-verify, which parses LaTeX into sympy and
compares symbolically (fractions, radicals, intervals, tuples, sets, equations).
"""

from __future__ import annotations

import re
import threading
from fractions import Fraction

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_NUMBER = r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+"
_NUMBER_RE = re.compile(rf"(?<![\w.])(?:{_NUMBER})(?:\s*/\s*\d+)?")
_HASHES_RE = re.compile(r"####\s*([^\n]+)")
_ANSWER_IS_RE = re.compile(r"answer\s+is\s*[:=]?\s*(.+?)(?:\.(?:\s|$)|\n|$)", re.IGNORECASE)
_UNITS = "dollars?|cents?|units?|degrees?|percent|meters?|cm|mm|km|kg|g|hours?|minutes?|seconds?|inch(?:es)?|feet|" \
         "foot|miles?|years?|days?"
_UNITS_RE = re.compile(rf"^({_NUMBER}|\\frac\{{-?\d+\}}\{{\d+\}})(?:\s+[a-zA-Z][a-zA-Z .]*|(?:{_UNITS})\.?)$")


def _box_contents(text: str) -> list[str]:
    """The contents of every complete \\boxed{...} / \\fbox{...} and `\\boxed 5` in order of appearance."""
    found = []
    for match in re.finditer(r"\\(?:boxed|fbox)\b", text):
        i = match.end()
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            depth, j = 0, i
            while j < len(text):
                c = text[j]
                if c == "\\":
                    j += 2
                    continue
                depth += c == "{"
                depth -= c == "}"
                if depth == 0:
                    found.append(text[i + 1:j])
                    break
                j += 1
        elif match.end() < len(text) and text[match.end()] == " ":
            word = re.match(r"[^\s$]+", text[i:])
            if word:
                found.append(word.group(0))
    return found


def extract_boxed(text: str) -> str | None:
    r"""The content of the last complete `\boxed{...}` (nested braces kept), or None."""
    boxes = _box_contents(text)
    return boxes[-1].strip() if boxes else None


def extract_hashes(text: str) -> str | None:
    """The answer after the last `#### ` (GSM8K's gold format), or None."""
    found = _HASHES_RE.findall(text)
    return found[-1].strip() if found else None


def extract_answer_is(text: str) -> str | None:
    """What follows the last "the answer is" (up to the end of the sentence or line), or None."""
    found = _ANSWER_IS_RE.findall(text)
    return found[-1].strip().strip("*").strip() if found and found[-1].strip() else None


def extract_last_number(text: str) -> str | None:
    """The last number in the text (a fraction like 3/4 counts as one), or None."""
    found = _NUMBER_RE.findall(text)
    return found[-1].strip() if found else None


def extract_answer(text: str) -> str | None:
    """The final answer of a completion: boxed, then `####`, then "the answer is", then the last number."""
    for extract in (extract_boxed, extract_hashes, extract_answer_is, extract_last_number):
        answer = extract(text)
        if answer:
            return answer
    return None


def _strip_text_wrappers(s: str) -> str:
    r"""`\text{abc}` / `\textbf{abc}` / `\mbox{abc}` -> `abc` (innermost first)."""
    previous = None
    while previous != s:
        previous = s
        s = re.sub(r"\\(?:text|textbf|textit|mathrm|mbox)\s*\{([^{}]*)\}", r"\1", s)
    return s


def normalize_answer(answer: str) -> str:
    r"""A canonical string for an answer: `$1,000.00` -> `1000`, `50\%` -> `50`, `\dfrac{1}{2}` -> `\frac{1}{2}`,
    `10 \text{ cm}` -> `10`, `x = 5` -> `5` (a single variable's value). Non-numeric LaTeX is only tidied."""
    s = answer.strip()
    s = s.replace("\\!", "").replace("\\,", "").replace("\\;", "").replace("\\ ", " ")
    s = s.replace("{,}", ",").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.replace("\\left", "").replace("\\right", "").replace("\\displaystyle", "")
    s = s.replace("^\\circ", "").replace("^{\\circ}", "").replace("\\%", "").replace("%", "").replace("\\$", "")
    s = s.replace("$", "").replace("**", "")
    s = _strip_text_wrappers(s).strip()
    s = re.sub(r"^[a-zA-Z]\s*=\s*(?=[-\d.\\])", "", s)  # "x = 5" -> "5"
    s = s.rstrip(".").strip()
    unit = _UNITS_RE.match(s)
    if unit:
        s = unit.group(1)
    if re.fullmatch(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s):
        s = s.replace(",", "")
    value = number_value(s)
    if value is not None and re.fullmatch(r"[-+]?\d*\.?\d+", s):
        return _format_number(value)
    return " ".join(s.split())


def _format_number(value: Fraction) -> str:
    """Integers without `.0`; other decimals in their shortest exact form."""
    if value.denominator == 1:
        return str(value.numerator)
    return f"{float(value):.12g}"


def number_value(s: str) -> Fraction | None:
    r"""The exact value of a plain number: `12`, `-3.50`, `.5`, `3/4`, `\frac{3}{4}`, `-\frac{3}{4}`; else None."""
    s = s.strip().replace(" ", "")
    m = re.fullmatch(r"([-+]?)\\frac\{([-+]?\d+)\}\{(\d+)\}", s) or re.fullmatch(r"([-+]?)\\frac(\d)(\d)", s)
    if m:
        sign = -1 if m.group(1) == "-" else 1
        return sign * Fraction(int(m.group(2)), int(m.group(3))) if int(m.group(3)) else None
    m = re.fullmatch(r"([-+]?\d+)/(\d+)", s)
    if m:
        return Fraction(int(m.group(1)), int(m.group(2))) if int(m.group(2)) else None
    if re.fullmatch(r"[-+]?(?:\d+\.?\d*|\.\d+)", s):
        return Fraction(s)
    return None


def answers_match(predicted: str | None, gold: str) -> bool:
    """Whether a predicted final answer equals the gold one (see the module docstring for the rules)."""
    if predicted is None or not predicted.strip():
        return False
    p, g = normalize_answer(predicted), normalize_answer(gold)
    if p == g:
        return True
    pv, gv = number_value(p), number_value(g)
    if pv is not None and gv is not None:
        return pv == gv
    return math_verify_equal(predicted, gold)


def math_verify_equal(predicted: str, gold: str) -> bool:
    """Symbolic equivalence through math-verify (both sides read as LaTeX); False on any parse failure."""
    from math_verify import (  # sympy and ANTLR: ~1 s to import, so only when needed
        parse,
        verify,
    )

    # math-verify times out through signal.alarm, which only the main thread may set.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    try:
        gold_parsed = parse(f"${gold}$", parsing_timeout=timeout)
        pred_parsed = parse(f"${predicted}$", parsing_timeout=timeout)
        if not gold_parsed or not pred_parsed:
            return False
        return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout))
    except Exception:  # noqa: BLE001 - an unparsable answer is a wrong answer
        return False


def math_reward(prompts: list[str], completions: list[str], answer: list[str], **_) -> list[float]:
    """1.0 where the completion's extracted final answer matches the gold `answer`, else 0.0."""
    return [float(answers_match(extract_answer(c), a)) for c, a in zip(completions, answer, strict=True)]
