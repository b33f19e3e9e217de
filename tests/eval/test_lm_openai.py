"""The OpenAI-compatible HTTP adapter against llmkit's own server (FastAPI app, in-process transport)."""
import pytest

from llmkit.eval.lm import LlmkitLM
from llmkit.eval.lm_openai import OpenAILM

fastapi = pytest.importorskip("fastapi")


@pytest.fixture(scope="module")
def served(tiny):
    from fastapi.testclient import TestClient

    from llmkit.infer.server import create_app

    model, tok = tiny
    with TestClient(create_app(model, tok, "tiny")) as client:
        yield client


def test_generation_over_http_equals_local_greedy(tiny, served):
    model, tok = tiny
    remote = OpenAILM("http://testserver/v1", "tiny", client=served)
    local = LlmkitLM(model, tok)
    prompts = ["The quick brown", "Question: What is 2 + 3?\nAnswer:"]
    assert remote.generate(prompts, max_new_tokens=8) == local.generate(prompts, max_new_tokens=8)
    assert remote.generate(prompts[:1], max_new_tokens=8, stop=[" "])[0].find(" ") == -1


def test_loglikelihood_needs_prompt_logprobs(served):
    remote = OpenAILM("http://testserver/v1", "tiny", client=served)
    with pytest.raises(RuntimeError, match="echo\\+logprobs"):
        remote.loglikelihood([("a", " b")])


def test_http_errors_are_reported(served):
    remote = OpenAILM("http://testserver/v1", "no-such-model", client=served)
    with pytest.raises(RuntimeError, match="HTTP 4"):
        remote.generate(["x"], max_new_tokens=2)
