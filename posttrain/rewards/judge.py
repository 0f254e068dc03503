"""Rewards from a judge: an OpenAI-compatible chat endpoint grades each completion against a rubric.

    rl.reward_funcs: ["posttrain.rewards.judge:http_judge(url='http://127.0.0.1:8000/v1', model='qwen')"]

For each sample the rubric (a template) is filled in and sent as one user message to `<url>/chat/completions`
(a local vLLM or llama.cpp server, or any provider); the grade is read from the reply (`parse_grade`) and mapped
from `score_range` to [0, 1]. Requests run `max_concurrency` at a time on a thread pool that lives for one batch.
A sample whose request finally fails, or whose reply holds no grade, gets None (no reward from the judge) and is
counted in the judge's `stats()`; the judge never raises into the trainer for an endpoint failure.

The local-model judge (a yes/no log-probability score) is `posttrain.rewards.judge_local.hf_judge`.
"""

from __future__ import annotations

import http.client
import inspect
import json
import logging
import math
import os
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger(__name__)

DEFAULT_RUBRIC = """You are grading a response to a request.

Request:
{prompt}

Response:
{completion}

Rate how correct, complete and helpful the response is, from {min_score} (worst) to {max_score} (best). \
Explain briefly if you need to, then end your reply with a line of the form "Score: N"."""

RETRY_STATUS = {408, 429}  # 4xx that are worth another try (request timeout, rate limit); every 5xx is too
_FIELD = re.compile(r"\{(\w+)\}")
_SCORE = re.compile(r"score\s*\**\s*[:=]\s*\**\s*(-?\d+(?:\.\d+)?)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_OBJECT = re.compile(r"\{[^{}]*\}")
_LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def template_fields(template: str) -> list[str]:
    """The `{name}` placeholders of a template, in order of first use (other braces are text)."""
    return list(dict.fromkeys(_FIELD.findall(template)))


def fill_template(template: str, fields: dict[str, object]) -> str:
    """`template` with each `{name}` that `fields` has replaced by `str(fields[name])`; other braces (a JSON
    example in a rubric) are left as they are, so they need no escaping."""
    return _FIELD.sub(lambda m: str(fields[m[1]]) if m[1] in fields else m[0], template)


def column_signature(columns: Sequence[str]) -> inspect.Signature:
    """`(prompts, completions, *, <columns>, **columns)`: the signature that tells `rewards.resolve.required_columns`
    which data columns a template needs, so a missing one is a config error before any model loads."""
    P = inspect.Parameter
    params = [P("prompts", P.POSITIONAL_OR_KEYWORD), P("completions", P.POSITIONAL_OR_KEYWORD)]
    params += [P(c, P.KEYWORD_ONLY) for c in columns] + [P("columns", P.VAR_KEYWORD)]
    return inspect.Signature(params)


def sample_fields(prompts: list[str], completions: list[str], columns: dict[str, Sequence], needed: Sequence[str],
                  i: int) -> dict[str, object]:
    """Sample i's template fields: prompt, completion and every column (ValueError naming a `needed` column that
    is missing)."""
    missing = [c for c in needed if c not in columns]
    if missing:
        raise ValueError(f"the judge's template needs the column {missing[0]!r}, which the batch does not have")
    return {**{k: v[i] for k, v in columns.items()}, "prompt": prompts[i], "completion": completions[i]}


def parse_grade(text: str) -> float | None:
    """The grade in a judge's reply, or None. Tried in order:

    1. a JSON object with a numeric "score": the whole reply, else the last `{...}` in it (a ```json block too);
    2. the last "Score: N" (any case; `=` for `:`, markdown bold around either part: "**Score:** 7");
    3. a reply that is only a number ("7", "7.5").

    "7/10" counts only as "Score: 7/10" (N is the number before the slash).
    """
    text = text.strip()
    for candidate in [text, *reversed(_OBJECT.findall(text))]:
        try:
            obj = json.loads(candidate)
        except ValueError:
            continue
        score = obj.get("score") if isinstance(obj, dict) else None
        if isinstance(score, (int, float)) and not isinstance(score, bool):
            return float(score)
    found = _SCORE.findall(text)
    if found:
        return float(found[-1])
    return float(text) if _NUMBER.fullmatch(text) else None


class HttpJudge:
    """A reward function that grades completions through an OpenAI-compatible chat endpoint (see `http_judge`).

    Counters, attributes kept over the judge's lifetime (`stats()` returns them as a dict): `samples` scored,
    `graded` (got a grade), `errors` (the request failed after its retries), `unparsed` (a reply that is not a
    chat completion, or holds no grade in `score_range`), `requests` (HTTP attempts), `retries`.
    """

    def __init__(self, url: str, model: str, rubric: str, timeout_s: float, retries: int, max_concurrency: int,
                 api_key_env: str | None, temperature: float, max_tokens: int, score_range: Sequence[float],
                 backoff_s: float, system: str | None, name: str):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"http_judge: url must start with http:// or https://, got {url!r}")
        try:
            lo, hi = (float(x) for x in score_range)
        except (TypeError, ValueError):
            lo = hi = math.nan
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError(f"http_judge: score_range must be (low, high) with low < high, got {score_range!r}")
        if timeout_s <= 0 or retries < 0 or max_concurrency < 1 or backoff_s < 0:
            raise ValueError("http_judge: needs timeout_s > 0, retries >= 0, max_concurrency >= 1, backoff_s >= 0")
        base = url.rstrip("/")
        self.endpoint = base if base.endswith("/chat/completions") else base + "/chat/completions"
        self.model, self.rubric, self.system = model, rubric, system
        self.timeout_s, self.max_retries, self.backoff_s = float(timeout_s), int(retries), float(backoff_s)
        self.max_concurrency, self.api_key_env = int(max_concurrency), api_key_env
        self.temperature, self.max_tokens, self.score_range = float(temperature), int(max_tokens), (lo, hi)
        self.columns = [f for f in template_fields(rubric) if f not in ("prompt", "completion", "min_score",
                                                                         "max_score")]  # data columns it needs
        self.__name__ = name
        self.__signature__ = column_signature(self.columns)
        host = urllib.parse.urlsplit(self.endpoint).hostname
        # a server on this machine is never reached through a proxy; others follow the *_proxy variables
        self._opener = urllib.request.build_opener(
            *([urllib.request.ProxyHandler({})] if host in _LOOPBACK else []))
        self._lock = threading.Lock()
        self.samples = self.graded = self.errors = self.unparsed = self.requests = self.retries = 0

    def stats(self) -> dict[str, int]:
        """The counters so far: samples, graded, errors, unparsed, requests, retries."""
        with self._lock:
            return {"samples": self.samples, "graded": self.graded, "errors": self.errors,
                    "unparsed": self.unparsed, "requests": self.requests, "retries": self.retries}

    def __call__(self, prompts: list[str], completions: list[str], **columns) -> list[float | None]:
        """One grade in [0, 1] per completion; None where the request failed or the reply held no grade."""
        lo, hi = self.score_range
        extra = {"min_score": f"{lo:g}", "max_score": f"{hi:g}"}
        fields = [{**extra, **sample_fields(prompts, completions, columns, self.columns, i)}
                  for i in range(len(completions))]
        messages = [fill_template(self.rubric, f) for f in fields]
        if not messages:
            return []
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(messages))) as pool:
            results = list(pool.map(lambda m: self._grade(m, headers, key), messages))  # (value, kind, why)
        kinds = [kind for _, kind, _ in results]
        errors, unparsed = kinds.count("error"), kinds.count("unparsed")
        with self._lock:
            self.samples += len(results)
            self.graded += len(results) - errors - unparsed
            self.errors += errors
            self.unparsed += unparsed
        if errors or unparsed:
            first = next(why for _, kind, why in results if kind)
            log.warning("%s: %d of %d samples got no grade (%d failed requests, %d replies without a grade); "
                        "first: %s", self.__name__, errors + unparsed, len(results), errors, unparsed, first)
        return [value for value, _, _ in results]

    def _grade(self, message: str, headers: dict[str, str], key: str | None) -> tuple[float | None, str, str]:
        """(grade in [0, 1], "", "") or (None, "error" | "unparsed", why) for one filled-in rubric."""
        chat = ([{"role": "system", "content": self.system}] if self.system else []) + [
            {"role": "user", "content": message}]
        body = json.dumps({"model": self.model, "messages": chat, "temperature": self.temperature,
                           "max_tokens": self.max_tokens}).encode()
        why = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            with self._lock:
                self.requests += 1
                self.retries += bool(attempt)
            try:
                request = urllib.request.Request(self.endpoint, data=body, headers=headers, method="POST")
                with self._opener.open(request, timeout=self.timeout_s) as response:
                    raw = response.read()
            except urllib.error.HTTPError as exc:
                why = _redact(f"HTTP {exc.code}: {_body(exc)}", key)
                if exc.code < 500 and exc.code not in RETRY_STATUS:
                    return None, "error", why
                continue
            except (OSError, http.client.HTTPException) as exc:  # refused, reset, timed out (URLError is an OSError)
                reason = getattr(exc, "reason", exc)
                why = _redact(f"{type(reason).__name__}: {reason}", key)
                continue
            return self._read(raw)
        return None, "error", f"{why} (after {self.max_retries + 1} attempts)"

    def _read(self, raw: bytes) -> tuple[float | None, str, str]:
        try:
            content = json.loads(raw)["choices"][0]["message"]["content"]
            text = content if isinstance(content, str) else ""
        except (ValueError, KeyError, IndexError, TypeError):
            return None, "unparsed", f"not a chat completion: {_snippet(raw.decode(errors='replace'))!r}"
        grade = parse_grade(text)
        lo, hi = self.score_range
        if grade is None or not lo <= grade <= hi:
            return None, "unparsed", f"no grade in {lo:g}..{hi:g} in the reply {_snippet(text)!r}"
        return (grade - lo) / (hi - lo), "", ""


def _body(exc: urllib.error.HTTPError) -> str:
    try:
        return _snippet(exc.read().decode(errors="replace")) or exc.reason
    except OSError:
        return str(exc.reason)


def _snippet(text: str, n: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n] + "..."


def _redact(text: str, key: str | None) -> str:
    return text.replace(key, "***") if key else text


def http_judge(url: str, model: str, rubric: str = DEFAULT_RUBRIC, timeout_s: float = 30.0, retries: int = 2,
               max_concurrency: int = 8, api_key_env: str | None = "OPENAI_API_KEY", temperature: float = 0.0,
               max_tokens: int = 256, score_range: Sequence[float] = (0, 10), backoff_s: float = 0.5,
               system: str | None = None, name: str = "judge") -> HttpJudge:
    """A reward function that asks a chat endpoint to grade each completion; returns an `HttpJudge`.

    url: the server's OpenAI base URL (`http://127.0.0.1:8000/v1`; `/chat/completions` is appended unless there).
    model: the `model` field of the request. rubric: the user message, a template: `{prompt}`, `{completion}`,
    `{min_score}`/`{max_score}` (from score_range) and any data column by name (`{answer}`), which the reward
    then requires. timeout_s: per socket operation (connect, each read) of one attempt. retries: further attempts
    after a timeout, a connection error, a 5xx, 408 or 429, waiting backoff_s * 2**k first; other 4xx are final.
    max_concurrency: requests in flight at once. api_key_env: the environment variable whose value is sent as
    `Authorization: Bearer ...` (read at each call, never logged; unset or empty: no header). score_range: the
    grades the rubric asks for, mapped linearly onto [0, 1]; a grade outside it counts as no grade. system: an
    optional system message. name: the reward's name in metrics (`reward/<name>`).
    """
    return HttpJudge(url, model, rubric, timeout_s, retries, max_concurrency, api_key_env, temperature, max_tokens,
                     score_range, backoff_s, system, name)
