"""Rewards from a judge: the HTTP judge against a stub OpenAI-compatible server on 127.0.0.1, the grade parser,
and the local HF yes/no judge on the stand-in model."""

from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from posttrain.rewards import RewardSet
from posttrain.rewards.judge import http_judge, parse_grade
from posttrain.rewards.resolve import required_columns, resolve_reward


def chat_reply(content) -> tuple[int, bytes]:
    return 200, json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()


class Server(ThreadingHTTPServer):
    request_queue_size = 64  # the default 5 drops simultaneous connects beyond it, and each waits 1 s to retry
    daemon_threads = True


class Stub:
    """A chat-completions server on a free port. `reply(body, n) -> (status, bytes)` answers the n-th request
    (from 0) after `delay` seconds; the server records each request's JSON and headers and the most requests it
    had in flight at once."""

    def __init__(self):
        self.reply = lambda body, n: chat_reply("Score: 7")
        self.delay = 0.0
        self.bodies, self.headers = [], []
        self.active = self.max_active = 0
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with stub.lock:
                    n = len(stub.bodies)
                    stub.bodies.append(body)
                    stub.headers.append(dict(self.headers))
                    stub.active += 1
                    stub.max_active = max(stub.max_active, stub.active)
                time.sleep(stub.delay)
                status, data = stub.reply(body, n)
                with stub.lock:  # before the reply goes out: once it is read, the client's slot is free again and
                    stub.active -= 1  # its next request may arrive before this handler would have counted it done
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client gave up (timeout)
                    pass

            def log_message(self, *args):
                pass

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"
        threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub():
    server = Stub()
    yield server
    server.close()


def judge(stub, **kw):
    return http_judge(stub.url, "stub-model", **{"timeout_s": 0.5, "retries": 2, "backoff_s": 0.01, **kw})


def test_grades_are_parsed_and_normalised(stub):
    grades = iter(["Good.\nScore: 7", '{"score": 10}', "Score: 0", "```json\n{\"score\": 2.5}\n```"])
    lock = threading.Lock()

    def reply(body, n):
        with lock:
            return chat_reply(next(grades))

    stub.reply = reply
    fn = judge(stub, max_concurrency=1)
    assert fn(["p"] * 4, ["a", "b", "c", "d"]) == [0.7, 1.0, 0.0, 0.25]
    assert fn.stats() == {"samples": 4, "graded": 4, "errors": 0, "unparsed": 0, "requests": 4, "retries": 0}
    body = stub.bodies[0]
    assert body["model"] == "stub-model" and body["temperature"] == 0.0 and body["max_tokens"] == 256
    assert "Request:\np\n\nResponse:\na\n" in body["messages"][0]["content"]
    assert "from 0 (worst) to 10 (best)" in body["messages"][0]["content"]


def test_rubric_takes_data_columns_and_requires_them(stub):
    stub.reply = lambda body, n: chat_reply("Score: 5")
    rubric = 'Q: {prompt}\nA: {completion}\nGold: {answer}\nReply {"score": N} with N from {min_score} to {max_score}.'
    fn = judge(stub, rubric=rubric, score_range=(1, 9))
    assert required_columns(fn) == ["answer"]
    assert fn(["2+2?"], ["4"], answer=["4"], other=["x"]) == [0.5]
    assert stub.bodies[0]["messages"][0]["content"] == 'Q: 2+2?\nA: 4\nGold: 4\nReply {"score": N} with N from 1 to 9.'
    with pytest.raises(ValueError, match="needs the column 'answer'"):
        fn(["2+2?"], ["4"])


def test_a_timeout_gives_none_and_returns_in_time(stub, caplog):
    stub.delay = 2.0
    fn = judge(stub, timeout_s=0.2, retries=1)
    start = time.perf_counter()
    with caplog.at_level(logging.WARNING, "posttrain.rewards.judge"):
        assert fn(["p", "q"], ["a", "b"]) == [None, None]
    assert time.perf_counter() - start < 1.0  # 2 attempts of 0.2 s, in parallel
    assert fn.stats() == {"samples": 2, "graded": 0, "errors": 2, "unparsed": 0, "requests": 4, "retries": 2}
    [line] = caplog.messages
    assert "2 of 2 samples got no grade (2 failed requests" in line and "timed out" in line


def test_a_500_is_retried_then_gives_none(stub):
    stub.reply = lambda body, n: (500, b'{"error": "overloaded"}')
    fn = judge(stub, retries=2)
    assert fn(["p"], ["a"]) == [None]
    assert fn.stats()["requests"] == 3 and fn.stats()["retries"] == 2 and fn.stats()["errors"] == 1


def test_a_500_then_success_recovers(stub):
    stub.reply = lambda body, n: (503, b"busy") if n == 0 else chat_reply("Score: 9")
    fn = judge(stub, retries=2)
    assert fn(["p"], ["a"]) == [0.9]
    assert fn.stats() == {"samples": 1, "graded": 1, "errors": 0, "unparsed": 0, "requests": 2, "retries": 1}


def test_a_4xx_is_not_retried(stub, caplog):
    stub.reply = lambda body, n: (400, b'{"error": "unknown model"}')
    fn = judge(stub, retries=2)
    with caplog.at_level(logging.WARNING, "posttrain.rewards.judge"):
        assert fn(["p"], ["a"]) == [None]
    assert fn.stats()["requests"] == 1 and fn.stats()["errors"] == 1
    assert "HTTP 400" in caplog.text and "unknown model" in caplog.text


@pytest.mark.parametrize("status, data", [(200, b"not json {"), (200, b'{"choices": []}'), chat_reply("Looks fine."),
                                          chat_reply("Score: 11"), chat_reply(None)])
def test_a_malformed_reply_or_one_without_a_grade_gives_none(stub, status, data):
    stub.reply = lambda body, n: (status, data)
    fn = judge(stub)
    assert fn(["p"], ["a"]) == [None]
    assert fn.stats() == {"samples": 1, "graded": 0, "errors": 0, "unparsed": 1, "requests": 1, "retries": 0}


def test_a_refused_connection_gives_none(stub):
    url = stub.url
    stub.close()
    fn = http_judge(url, "m", timeout_s=0.5, retries=1, backoff_s=0.01)
    assert fn(["p"], ["a"]) == [None] and fn.stats()["errors"] == 1 and fn.stats()["requests"] == 2


@pytest.mark.parametrize("max_concurrency", [8, 2])
def test_concurrency_is_bounded(stub, max_concurrency):
    stub.delay = 0.1
    fn = judge(stub, max_concurrency=max_concurrency)
    assert fn(["p"] * 8, ["a"] * 8) == [0.7] * 8
    assert 1 < stub.max_active <= max_concurrency


def test_the_key_is_sent_from_the_env_and_never_logged(stub, monkeypatch, caplog):
    monkeypatch.setenv("JUDGE_TEST_KEY", "sk-secret-123")
    stub.reply = lambda body, n: (401, b'{"error": "bad key sk-secret-123"}') if n else chat_reply("Score: 1")
    fn = judge(stub, api_key_env="JUDGE_TEST_KEY")
    assert fn(["p"], ["a"]) == [0.1]
    assert stub.headers[0]["Authorization"] == "Bearer sk-secret-123"
    with caplog.at_level(logging.DEBUG):
        assert fn(["p"], ["a"]) == [None]
    assert "HTTP 401" in caplog.text and "sk-secret" not in caplog.text
    monkeypatch.delenv("JUDGE_TEST_KEY")
    fn(["p"], ["a"])
    assert "Authorization" not in stub.headers[-1]


def test_inside_a_reward_set_a_failed_grade_is_not_applicable(stub):
    stub.reply = lambda body, n: chat_reply("Score: 10" if body["messages"][0]["content"].count("good") else "meh")
    scores = RewardSet({"judge": judge(stub)}).score(["p", "p"], ["good", "bad"])
    assert scores.components["judge"] == [1.0, None]
    assert scores.metrics["reward/judge/applicable"] == 0.5 and scores.metrics["reward/errors"] == 0


def test_a_config_spec_builds_the_judge():
    fn = resolve_reward("posttrain.rewards.judge:http_judge(url='http://127.0.0.1:9/v1', model='qwen', "
                        "score_range=(1, 5), max_concurrency=4)")
    assert fn.endpoint == "http://127.0.0.1:9/v1/chat/completions" and fn.score_range == (1.0, 5.0)
    assert fn.max_concurrency == 4 and fn.__name__ == "judge" and required_columns(fn) == []
    with pytest.raises(ValueError, match="score_range"):
        http_judge("http://x/v1", "m", score_range=(5, 5))
    with pytest.raises(ValueError, match="score_range"):
        http_judge("http://x/v1", "m", score_range=(1, 2, 3))
    with pytest.raises(ValueError, match="url must start with"):
        http_judge("127.0.0.1:8000", "m")


@pytest.mark.parametrize("text, grade", [
    ("Score: 7", 7.0), ("The response is fine.\n\n**Score:** 8", 8.0), ("score = 6.5", 6.5), ("SCORE: 3/10", 3.0),
    ('{"score": 4, "reason": "ok"}', 4.0), ('Reasoning...\n{"reason": "x", "score": 9}', 9.0), ("  5 ", 5.0),
    ("Score: 2 at first, then Score: 4", 4.0), ("no grade here", None), ('{"score": "7"}', None), ("", None),
    ("7 out of 10", None),
])
def test_parse_grade(text, grade):
    assert parse_grade(text) == grade


# ---- the local HF judge -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf(stand_in):
    from posttrain.rewards.judge_local import hf_judge

    return hf_judge(str(stand_in), batch_size=3)


PROMPTS = ["What is 2 + 2?", "Name a colour.", "What is the capital of France?", "Say hi."]
COMPLETIONS = ["4", "Blue, like the sky on a clear summer day.", "Paris", "hello there"]


def test_hf_judge_scores_are_probabilities_and_deterministic(hf):
    scores = hf(PROMPTS, COMPLETIONS)
    assert all(0 < s < 1 for s in scores)
    assert hf(PROMPTS, COMPLETIONS) == scores
    one_by_one = [hf([p], [c])[0] for p, c in zip(PROMPTS, COMPLETIONS)]  # no padding
    assert one_by_one == pytest.approx(scores, abs=1e-5)
    assert hf.samples == 12 and hf.too_long == 0


def test_hf_judge_equals_the_softmax_over_the_yes_and_no_tokens(hf, stand_in):
    from posttrain.rewards.judge_local import DEFAULT_QUESTION, hf_judge

    model, tok = hf.load()
    question = DEFAULT_QUESTION.format(prompt=PROMPTS[0], completion=COMPLETIONS[0])
    text = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
    assert hf.texts(PROMPTS[:1], COMPLETIONS[:1]) == [text] and text.endswith("<|im_start|>assistant\n")
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        p = model(input_ids=ids).logits[0, -1].double().softmax(-1)
    [yes], [no] = tok.encode("Yes", add_special_tokens=False), tok.encode("No", add_special_tokens=False)
    two = hf_judge(str(stand_in), yes=("Yes",), no=("No",))
    assert two(PROMPTS[:1], COMPLETIONS[:1])[0] == pytest.approx((p[yes] / (p[yes] + p[no])).item(), abs=1e-6)
    Y = [tok.encode(w, add_special_tokens=False)[0] for w in ("Yes", "yes", " Yes", " yes")]
    N = [tok.encode(w, add_special_tokens=False)[0] for w in ("No", "no", " No", " no")]
    assert hf.yes_ids == Y and hf.no_ids == N
    assert hf(PROMPTS[:1], COMPLETIONS[:1])[0] == pytest.approx((p[Y].sum() / (p[Y].sum() + p[N].sum())).item(),
                                                                abs=1e-6)


def test_hf_judge_template_columns_and_bad_arguments(stand_in, tmp_path):
    from posttrain.rewards.judge_local import hf_judge

    fn = hf_judge(str(stand_in), question_template="Q: {prompt}\nA: {completion}\nGold: {answer}\nCorrect?")
    assert required_columns(fn) == ["answer"]
    assert "Gold: 4\nCorrect?" in fn.texts(["2+2?"], ["4"], answer=["4"])[0]
    with pytest.raises(ValueError, match="not a Hugging Face model directory"):
        hf_judge(str(tmp_path))
    with pytest.raises(ValueError, match="one-token yes and no words"):
        hf_judge(str(stand_in), yes=("YES",)).load()  # "YES" is two tokens in SmolLM2's vocabulary
