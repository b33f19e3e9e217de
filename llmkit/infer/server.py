"""`llmkit serve`: an OpenAI-compatible HTTP server with a web chat page (survey §4.2.4 serving, §6.4 tools).

Implements:
- `/v1/models`, `/v1/completions`, `/v1/chat/completions` (SSE streaming, stop, max_tokens,
  temperature, top_p, seed, n, tools / tool_choice), `/health`, `/metrics` (Prometheus text),
  the chat page at `/` (files in `web/`, no CDN) and `/tools` + `/tools/run` for its built-in tools;
- all requests share the model through `batcher.Batcher` (continuous batching);
- security: optional API key (`hmac.compare_digest`), validation with 4xx errors in OpenAI's error
  shape, limits on body size, prompt tokens, max_tokens, n and requests in flight (429 beyond), the
  model name is only compared with the served id (nothing from a request reaches the loader), and
  the default bind is loopback;
- `main(argv)` for the CLI and `serve_command(spec)` for the demo.
Request schemas and limits live in `server_schema.py`, streaming and response shaping in `server_stream.py`.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import hmac
import json
import time
import weakref
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .batcher import Batcher, Request
from .sampling import GenerationConfig
from .server_schema import APIError, ChatRequest, CompletionRequest, Limits, ToolRunRequest
from .server_stream import Completion, Detok, _find_stop, _safe_len, release_once
from .tools_call import builtin_tools, render_chat, run_builtin_tool, tool_safe_len

WEB = Path(__file__).parent / "web"
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")


def _err(e: APIError) -> JSONResponse:
    return JSONResponse(e.body, status_code=e.status)


class Server:
    """The state behind the routes: model, tokenizer, batcher, limits and counters."""

    def __init__(self, model, tokenizer, model_id: str, api_key: str | None, limits: Limits, max_batch: int,
                 python_tool: bool = False):
        self.tok, self.model_id, self.limits, self.python_tool = tokenizer, model_id, limits, python_tool
        self.api_key = api_key.encode() if api_key else None
        self.max_context = min(model.cfg.max_seq_len, limits.max_prompt_tokens + limits.max_tokens)
        self.batcher = Batcher(model, self._stop_ids(tokenizer), max_batch=max_batch, max_context=self.max_context)
        self.inflight = 0
        self.counters = {"ttft_sum": 0.0, "ttft_count": 0}
        self.http: dict[tuple[str, int], int] = {}
        self.created = int(time.time())

    @staticmethod
    def _stop_ids(tok) -> list[int]:
        ids = [tok.eos_token_id]
        lookup = getattr(tok, "token_to_id", None)
        for t in END_OF_TURN if lookup else ():
            ids.append(lookup(t))
        return [i for i in ids if i is not None]

    # ------------------------------------------------------------------ checks
    def check_key(self, req: HTTPRequest) -> None:
        if self.api_key is None:
            return
        auth = req.headers.get("authorization", "")
        given = auth[7:].strip() if auth.lower().startswith("bearer ") else req.headers.get("x-api-key", "")
        if not hmac.compare_digest(given.encode(), self.api_key):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")

    async def parse(self, req: HTTPRequest, schema):
        limit = self.limits.max_body_bytes
        too_big = APIError(413, f"request body is larger than this server's limit of {limit} bytes")
        declared = req.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_big
        body = bytearray()
        async for chunk in req.stream():  # read at most `limit` bytes, whatever the header said
            body += chunk
            if len(body) > limit:
                raise too_big
        try:
            obj = json.loads(body)
        except ValueError as e:
            raise APIError(400, f"request body is not valid JSON: {e}") from None
        try:
            parsed = schema.model_validate(obj)
        except ValidationError as e:
            first = e.errors()[0]
            param = ".".join(str(p) for p in first["loc"])
            raise APIError(400, f"invalid request: {param}: {first['msg']}", param=param) from None
        if getattr(parsed, "model", self.model_id) != self.model_id:
            raise APIError(404, f"model {parsed.model!r} is not served here; this server serves {self.model_id!r}",
                           param="model", code="model_not_found")
        return parsed

    def encode(self, text: str) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False)
        if len(ids) > self.limits.max_prompt_tokens or len(ids) >= self.max_context:
            raise APIError(400, f"prompt is {len(ids)} tokens; this server accepts at most "
                                f"{min(self.limits.max_prompt_tokens, self.max_context - 1)}",
                           param="messages", code="context_length_exceeded")
        if not ids:
            raise APIError(400, "prompt is empty", param="prompt")
        return ids

    def sampling(self, body, prompt_len: int, index: int) -> GenerationConfig:
        room = self.max_context - prompt_len
        mt = body.max_completion_tokens or body.max_tokens
        if mt is not None and mt > min(room, self.limits.max_tokens):
            raise APIError(400, f"max_tokens={mt} is too large: at most {min(room, self.limits.max_tokens)} for "
                                f"this {prompt_len}-token prompt", param="max_tokens")
        seed = None if body.seed is None else body.seed + index  # n choices with one seed still differ
        return GenerationConfig(max_new_tokens=mt or min(room, self.limits.max_tokens),
                                temperature=1.0 if body.temperature is None else body.temperature,
                                top_p=1.0 if body.top_p is None else body.top_p, seed=seed)

    def reserve(self, k: int) -> None:
        if self.inflight + k > self.limits.max_concurrent:
            raise APIError(429, f"server busy: {self.inflight} generations in flight (limit "
                                f"{self.limits.max_concurrent}); retry shortly", type_="rate_limit_exceeded",
                           code="rate_limit_exceeded")
        self.inflight += k

    def release(self, k: int) -> None:
        self.inflight -= k

    # ------------------------------------------------------------------ generation
    async def generate(self, ids: list[int], params: GenerationConfig, stop: list[str], hold_tools: bool):
        """Yields (text delta, None, n) while generating, then (rest of text, finish_reason, n, full text).

        With `hold_tools`, text that may still become a tool call is held back; the last item then
        carries it so the caller can parse it. Leaving the loop early cancels the row in the batcher.
        """
        loop, q = asyncio.get_running_loop(), asyncio.Queue()
        req = Request(ids, params, lambda t, f: loop.call_soon_threadsafe(q.put_nowait, (t, f)))
        self.batcher.submit(req)
        detok, text, sent, reason = Detok(self.tok), "", 0, None
        try:
            while reason is None:
                tok, reason = await q.get()
                if tok is not None:
                    text += detok.add(tok)
                    if detok.n == 1:
                        self.counters["ttft_sum"] += req.first_token_at - req.submitted_at
                        self.counters["ttft_count"] += 1
                cut = _find_stop(text, stop)
                if cut is not None:
                    text, reason = text[:cut], "stop"
                    req.cancel()
                if reason is None:
                    safe = _safe_len(text, stop)
                    if hold_tools:
                        safe = min(safe, tool_safe_len(text))
                    if safe > sent:
                        yield text[sent:safe], None, req.generated, None
                        sent = safe
            if cut is None:  # release a trailing partial character; it may complete a stop string
                text += detok.flush()
                cut = _find_stop(text, stop)
                text, reason = (text[:cut], "stop") if cut is not None else (text, reason)
            if reason == "error":
                raise APIError(500, "generation failed inside the server; see its log", type_="server_error")
            final = "stop" if reason == "cancelled" else reason
            yield text[sent:], final, req.generated, text
        finally:
            req.cancel()


def _metrics(srv: Server) -> str:
    st, b = srv.batcher.stats, srv.batcher
    rows = [("llmkit_prompt_tokens_total", "counter", st["prompt_tokens"]),
            ("llmkit_generation_tokens_total", "counter", st["generated_tokens"]),
            ("llmkit_decode_steps_total", "counter", st["steps"]),
            ("llmkit_batched_decode_steps_total", "counter", st["batched_steps"]),
            ("llmkit_decode_rows_total", "counter", st["row_steps"]),
            ("llmkit_prefills_total", "counter", st["prefills"]),
            ("llmkit_generations_finished_total", "counter", st["finished"]),
            ("llmkit_generations_cancelled_total", "counter", st["cancelled"]),
            ("llmkit_generation_errors_total", "counter", st["errors"]),
            ("llmkit_running_rows", "gauge", b.running), ("llmkit_waiting_requests", "gauge", b.waiting),
            ("llmkit_inflight_generations", "gauge", srv.inflight)]
    lines = []
    for name, kind, v in rows:
        lines += [f"# TYPE {name} {kind}", f"{name} {v}"]
    lines += ["# TYPE llmkit_time_to_first_token_seconds summary",
              f"llmkit_time_to_first_token_seconds_sum {srv.counters['ttft_sum']:.6f}",
              f"llmkit_time_to_first_token_seconds_count {srv.counters['ttft_count']}",
              "# TYPE llmkit_http_requests_total counter"]
    lines += [f'llmkit_http_requests_total{{path="{p}",status="{c}"}} {n}' for (p, c), n in sorted(srv.http.items())]
    return "\n".join(lines) + "\n"


ROUTES = ("/", "/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions", "/tools", "/tools/run")
CSP = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'"


class _CountRequests:
    """Pure ASGI middleware (BaseHTTPMiddleware would buffer streams): HTTP status counts per route."""

    def __init__(self, app, srv: Server):
        self.app, self.srv = app, srv

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"] if scope["path"] in ROUTES else "other"

        async def counting_send(msg):
            if msg["type"] == "http.response.start":
                key = (path, msg["status"])
                self.srv.http[key] = self.srv.http.get(key, 0) + 1
            await send(msg)

        await self.app(scope, receive, counting_send)


def build_app(srv: Server) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app):
        srv.batcher.start()
        yield
        srv.batcher.stop()

    app = FastAPI(title="llmkit", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = srv

    @app.exception_handler(APIError)
    async def api_error(req, e):
        return _err(e)

    @app.exception_handler(Exception)
    async def internal_error(req, e):
        return _err(APIError(500, f"internal error ({type(e).__name__}: {e}); the server keeps running",
                             type_="server_error"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(req, e):
        return _err(APIError(e.status_code, f"{req.method} {req.url.path}: {e.detail}", code=None))

    app.add_middleware(_CountRequests, srv=srv)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": srv.model_id, "running": srv.batcher.running, "waiting": srv.batcher.waiting}

    @app.get("/metrics")
    async def metrics(req: HTTPRequest):
        srv.check_key(req)
        return PlainTextResponse(_metrics(srv), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(req: HTTPRequest):
        srv.check_key(req)
        return {"object": "list", "data": [{"id": srv.model_id, "object": "model", "created": srv.created,
                                            "owned_by": "llmkit"}]}

    async def respond(req: HTTPRequest, chat: bool):
        srv.check_key(req)
        body = await srv.parse(req, ChatRequest if chat else CompletionRequest)
        if body.n > srv.limits.max_n:
            raise APIError(400, f"n={body.n} is above this server's limit of {srv.limits.max_n}", param="n")
        tools, texts = None, None
        if chat:
            tools = [t.model_dump() for t in body.tools or []] if body.tool_choice != "none" else None
            if isinstance(body.tool_choice, dict):  # {"type": "function", "function": {"name": ...}}
                want = (body.tool_choice.get("function") or {}).get("name")
                tools = [t for t in tools or [] if t["function"]["name"] == want] or None
            try:
                prompt = render_chat(srv.tok, [m.plain() for m in body.messages], tools or None)
            except Exception as e:  # a template may reject a conversation (e.g. roles must alternate)
                raise APIError(400, f"the model's chat template rejected these messages: {e}", param="messages")
            prompts = [srv.encode(prompt)]
        else:
            texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
            if not texts or len(texts) > srv.limits.max_n:
                raise APIError(400, f"prompt must be a string or a list of 1..{srv.limits.max_n} strings", param="prompt")
            prompts = [srv.encode(t) for t in texts]
        job = Completion(srv, chat, body, prompts, tools or None, texts)
        srv.reserve(len(job.jobs))
        if body.stream:
            gen = job.stream()
            weakref.finalize(gen, release_once, srv, job)  # a stream never started still frees its slots
            return StreamingResponse(gen, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            return await job.full()
        finally:
            release_once(srv, job)

    @app.post("/v1/completions")
    async def completions(req: HTTPRequest):
        return await respond(req, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: HTTPRequest):
        return await respond(req, chat=True)

    @app.get("/tools")
    async def tools_list(req: HTTPRequest):
        srv.check_key(req)
        py = srv.python_tool
        note = "" if any(t["function"]["name"] == "python" for t in builtin_tools(py)) else (
            "Python tool off: start the server with --python-tool (needs llmkit.prompting.sandbox)")
        return {"tools": builtin_tools(py), "note": note}

    @app.post("/tools/run")
    async def tools_run(req: HTTPRequest):
        srv.check_key(req)
        body = await srv.parse(req, ToolRunRequest)
        args = body.arguments
        if isinstance(args, str):
            try:
                args = json.loads(args or "{}")
            except ValueError:
                raise APIError(400, "tool arguments are not valid JSON", param="arguments") from None
        if not isinstance(args, dict):
            raise APIError(400, "tool arguments must be a JSON object", param="arguments")
        try:
            out = await asyncio.to_thread(run_builtin_tool, body.name, args, srv.python_tool)
        except KeyError as e:
            raise APIError(404, str(e.args[0]), param="name") from None
        return {"name": body.name, "content": out}

    @app.get("/")
    async def index():
        return FileResponse(WEB / "index.html", headers={"Content-Security-Policy": CSP})

    app.mount("/static", StaticFiles(directory=WEB), name="static")
    return app


def create_app(model, tokenizer, model_id: str, *, api_key: str | None = None, limits: Limits | None = None,
               max_batch: int = 32, python_tool: bool = False) -> FastAPI:
    """The FastAPI app; the batcher thread starts and stops with the app (lifespan)."""
    return build_app(Server(model, tokenizer, model_id, api_key, limits or Limits(), max_batch, python_tool))


def serve_command(model_spec: str, port: int = 8000) -> str:
    """What the demo prints: the command that serves `model_spec` and the chat page's address."""
    python = " --python-tool" if any(t["function"]["name"] == "python" for t in builtin_tools(True)) else ""
    return (f".venv/bin/python -m llmkit serve {model_spec} --port {port}{python}\n"
            f"then open http://127.0.0.1:{port}/ (chat page) or point an OpenAI client at http://127.0.0.1:{port}/v1")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="llmkit serve", description="OpenAI-compatible server + web chat page.")
    p.add_argument("model", help="checkpoint dir, HF dir, .gguf file or alias (as `llmkit.load` accepts)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback; use 0.0.0.0 with --api-key)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1, /tools and /metrics "
                   "(or set LLMKIT_API_KEY, which other users cannot read from the process list)")
    p.add_argument("--max-batch", type=int, default=32, help="rows decoded together (continuous batching)")
    p.add_argument("--max-concurrent", type=int, default=Limits.max_concurrent)
    p.add_argument("--max-prompt-tokens", type=int, default=Limits.max_prompt_tokens)
    p.add_argument("--max-tokens", type=int, default=Limits.max_tokens)
    p.add_argument("--max-n", type=int, default=Limits.max_n)
    p.add_argument("--served-name", default=None, help="model id clients must send (default: from MODEL)")
    p.add_argument("--python-tool", action="store_true", help="offer the sandboxed Python tool on the chat page")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="compute dtype; bfloat16 halves weight traffic and uses AMX/AVX512-BF16 CPUs' matmul units")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    a = p.parse_args(argv)
    import os

    import uvicorn

    import llmkit

    key = a.api_key or os.environ.get("LLMKIT_API_KEY")
    if a.host not in ("127.0.0.1", "localhost", "::1") and not key:
        print(f"llmkit serve: warning: binding {a.host} without --api-key exposes the model to the network")
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    try:
        model, tok = llmkit.load(a.model)
    except (ValueError, FileNotFoundError) as e:  # LoadError is a ValueError; its message says what to do
        print(f"llmkit serve: {e}", file=sys.stderr)
        return 2
    if a.dtype == "bfloat16":
        import torch

        model = model.to(torch.bfloat16)
    name = a.served_name or Path(str(a.model).rstrip("/")).name.removesuffix(".gguf")
    limits = Limits(a.max_prompt_tokens, a.max_tokens, a.max_n, a.max_concurrent)
    app = create_app(model, tok, name, api_key=key, limits=limits, max_batch=a.max_batch, python_tool=a.python_tool)
    print(f"llmkit serve: {name} on http://{a.host}:{a.port}/  (OpenAI API at /v1)", flush=True)
    uvicorn.run(app, host=a.host, port=a.port, log_level="warning")
    return 0
