"""The chat page in a real browser (Debian's chromium driven by Playwright): a streamed reply, multi-turn
history, the stop button (the server cancels the generation), settings, a visible calculator tool call,
and the markdown renderer never lets model output inject HTML."""
import json
import shutil
import time

import httpx
import pytest
import torch

from llmkit.infer.tools_call import builtin_tools
from serve_util import one_torch_thread, running_server, tiny_model, tiny_tokenizer, train_to_call  # noqa: F401

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run"]

playwright_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (no `playwright install`)")
if shutil.which("chromium") is None:
    pytest.skip("Debian's chromium is not installed: apt-get install -y chromium", allow_module_level=True)


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        yield b
        b.close()


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def open_page(browser, url):
    page = browser.new_page(bypass_csp=True)  # the page's CSP forbids eval, which wait_for_function uses
    sent = []
    page.on("request", lambda r: sent.append(json.loads(r.post_data)) if r.url.endswith("/v1/chat/completions") else None)
    page.goto(url + "/")
    page.wait_for_function("document.getElementById('model').textContent.length > 0")
    page.click("#settings summary")
    return page, sent


def test_stream_multiturn_and_stop(browser, tok):
    torch.set_num_threads(1)
    model = tiny_model(tok, max_seq_len=4096, no_eos_when_greedy=True)  # greedy replies run to max_tokens
    # a real model's pace (~15 ms a step): this tiny one can emit all 40 tokens within one browser read, and
    # the test is about the page rendering a stream piece by piece, not about how fast the model is
    model.register_forward_pre_hook(lambda *_: time.sleep(0.015))
    with running_server(model, tok, "tiny") as (url, app):
        page, sent = open_page(browser, url)
        page.fill("#temperature", "0")
        page.fill("#max-tokens", "40")
        page.evaluate("""() => { window.updates = 0; new MutationObserver(() => window.updates++)
            .observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true}); }""")
        page.fill("#input", "Hello there")
        page.press("#input", "Enter")
        page.wait_for_selector(".msg.assistant[data-finish='length']", timeout=30_000)
        reply = page.inner_text(".msg.assistant .body")
        assert reply.strip() and page.evaluate("window.updates") > 5  # the reply arrived in many pieces
        assert sent[0]["temperature"] == 0 and sent[0]["max_tokens"] == 40 and sent[0]["stream"] is True

        page.fill("#input", "And again")
        page.click("#send")
        page.wait_for_function("document.querySelectorAll(\".msg.assistant[data-finish='length']\").length == 2")
        assert [m["role"] for m in sent[1]["messages"]] == ["user", "assistant", "user"]
        assert sent[1]["messages"][0]["content"] == "Hello there"

        # stop: a long reply, cut off by the button; the server cancels the row
        stats = app.state.server.batcher.stats
        cancelled = stats["cancelled"]
        page.fill("#max-tokens", "2000")  # the server default caps max_tokens at 2048
        page.fill("#input", "Tell me a long story")
        page.press("#input", "Enter")
        page.wait_for_function("""() => { const b = document.querySelectorAll('.msg.assistant .body');
            return b.length == 3 && b[2].textContent.length > 0; }""")
        page.click("#stop")
        page.wait_for_selector(".msg.assistant[data-finish='stopped']", timeout=10_000)
        assert page.is_visible(".stopped-note") and page.is_enabled("#send") and not page.is_enabled("#stop")
        t0 = time.time()
        while stats["cancelled"] == cancelled and time.time() - t0 < 10:
            time.sleep(0.05)
        assert stats["cancelled"] == cancelled + 1
        assert app.state.server.batcher.running == 0
        page.close()


def test_visible_calculator_tool_call(browser, tok):
    torch.set_num_threads(1)
    ask = [{"role": "user", "content": "What is 6*7?"}]
    call = '<tool_call>[{"name": "calculator", "arguments": {"expression": "6*7"}}]</tool_call>'
    model = train_to_call(tok, ask, builtin_tools(python=False), call)
    with running_server(model, tok, "tiny") as (url, app):
        page, sent = open_page(browser, url)
        assert "calculator" in page.inner_text("#tool-names")
        page.fill("#temperature", "0")
        page.fill("#max-tokens", "80")  # the call is 43 tokens of this tokenizer
        page.check("#use-tools")
        page.fill("#input", "What is 6*7?")
        page.press("#input", "Enter")
        page.wait_for_selector(".msg.tool", timeout=30_000)
        assert page.inner_text(".msg.tool code") == "calculator"
        assert json.loads(page.inner_text(".msg.tool .tool-args")) == {"expression": "6*7"}
        assert page.inner_text(".msg.tool .tool-result") == "42"
        page.wait_for_function("!document.getElementById('send').disabled", timeout=30_000)
        roles = [m["role"] for m in sent[1]["messages"]]  # the page sent the tool result back to the model
        assert roles == ["user", "assistant", "tool"] and sent[1]["messages"][2]["content"] == "42"
        page.close()


def test_markdown_renderer_is_safe(browser, tok):
    with running_server(tiny_model(tok), tok, "tiny") as (url, _):
        assert "script-src 'self'" in httpx.get(url + "/").headers["content-security-policy"]
        page = browser.new_page(bypass_csp=True)
        page.goto(url + "/")
        html = page.evaluate("""() => renderMarkdown(
            "# Title\\n**bold** and `x<y` <img src=x onerror=alert(1)> [ok](https://e.org) [bad](javascript:alert(1))\\n" +
            "- a\\n- b\\n```python\\nprint('<b>')\\n```")""")
        page.set_content(f"<div id=r>{html}</div>")
        assert page.locator("#r img").count() == 0 and page.locator("#r script").count() == 0
        assert page.inner_text("#r h1") == "Title" and page.inner_text("#r strong") == "bold"
        assert page.inner_text("#r p code") == "x<y" and page.locator("#r li").count() == 2
        assert page.inner_text("#r pre code.lang-python") == "print('<b>')"
        assert page.locator("#r a").count() == 1 and page.get_attribute("#r a", "href") == "https://e.org"
        page.close()
