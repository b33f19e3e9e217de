"""Continuous batching for serving (survey §4.2.4 / §9.5: iteration-level scheduling of Orca and vLLM).

Implements:
- `Request`: one generation with its own `sampling.GenerationConfig` (limits, sampler, seed) and RNG;
- `Batcher`: one background thread owns the model; new requests are prefilled and *join the running
  batch between decode steps*, finished or cancelled rows leave it, so concurrent clients share
  every decode step instead of queueing behind each other;
- the KV cache layout: one preallocated `KVCache` whose time axis is shared by all rows; each row's
  history is right-aligned at the cache's write position (exactly the left-padding convention of
  `Transformer`: `attn_mask` marks each row's valid slots, `positions` are the row's own positions),
  so a joining row is a copy of its prefill cache into a free row, and RoPE/ALiBi/windows see the
  same relative distances as an unbatched run;
- housekeeping that keeps copies rare: free rows are reused; the row count grows and shrinks by
  powers of two; the time axis is compacted (shifted left) when its oldest slots are no one's any more
  and doubled only when compaction cannot make room.

Prompts that arrive together are prefilled together (left-padded groups of similar length, at most
`PREFILL_TOKENS` tokens per forward). Not covered: paged (block-table) KV memory, prefix sharing between
requests, and chunked prefill (a long prompt's prefill pauses the running rows for its duration).
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from llmkit.model.attention import KVCache

from .sampling import GenerationConfig, make_generator, sample_next

# tokens in one prefill forward (rows x longest prompt): bounds the [rows, heads, P, P] attention scores
# of a padded group; vLLM's max_num_batched_tokens plays the same role (its default is 2048 too)
PREFILL_TOKENS = 2048
Emit = Callable[[int | None, str | None], None]  # (token id or None, finish reason or None)


@dataclass
class Request:
    prompt_ids: list[int]
    params: GenerationConfig  # max_new_tokens, temperature/top_p/..., seed, eos_token_id (extra stop ids)
    emit: Emit
    cancelled: bool = False
    generated: int = 0
    submitted_at: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None

    def __post_init__(self):
        self.generator = None  # made on the model's device when the request is prefilled
        eos = self.params.eos_token_id
        self.stop_ids = set() if eos is None else set([eos] if isinstance(eos, int) else eos)

    def cancel(self) -> None:
        """Called from any thread; the batcher frees the row before its next decode step."""
        self.cancelled = True


def _send(req: Request, tok: int | None, reason: str | None) -> None:
    """Deliver to the client; a client that can no longer receive (closed event loop) is cancelled."""
    try:
        req.emit(tok, reason)
    except RuntimeError:
        req.cancelled = True


@dataclass
class _Row:
    req: Request
    start: int  # first cache slot holding this row's history
    pos: int  # number of tokens of this row in the cache = position of `next_token`
    next_token: int


class Batcher:
    """Owns `model` on a background thread; `submit` is thread-safe and returns immediately."""

    def __init__(self, model, eos_token_ids=(), max_batch: int = 32, max_context: int | None = None):
        self.model = model.eval()
        self.eos = set(int(t) for t in eos_token_ids if t is not None)
        self.max_batch = max_batch
        self.max_context = max_context or model.cfg.max_seq_len
        self.cache: KVCache | None = None
        self.rows: list[_Row | None] = []
        self._pending: deque[Request] = deque()
        self._cv = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.stats = dict(steps=0, batched_steps=0, row_steps=0, max_rows=0, prefills=0, prefill_forwards=0, prompt_tokens=0,
                          generated_tokens=0, finished=0, cancelled=0, errors=0)

    # ------------------------------------------------------------------ public API
    def start(self) -> "Batcher":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="llmkit-batcher", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def submit(self, req: Request) -> Request:
        with self._cv:
            self._pending.append(req)
            self._cv.notify()
        return req

    @property
    def running(self) -> int:
        return sum(r is not None for r in self.rows)

    @property
    def waiting(self) -> int:
        return len(self._pending)

    # ------------------------------------------------------------------ loop
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cv:
                while not self._stop and not self._pending and self.running == 0:
                    self._cv.wait()
                if self._stop:
                    break
                joiners = []
                while self._pending and self.running + len(joiners) < self.max_batch:
                    joiners.append(self._pending.popleft())
            try:
                with torch.inference_mode():
                    self._admit_all(joiners)
                    self._drop_cancelled()
                    if self.running:
                        self._decode_step()
            except Exception as e:  # keep serving: fail the rows in flight, drop the cache
                self._fail_all(e)
        self._fail_all(RuntimeError("server shutting down"))

    def _finish(self, req: Request, reason: str) -> None:
        self.stats["cancelled" if reason == "cancelled" else "finished"] += 1
        _send(req, None, reason)

    def _fail_all(self, err: Exception) -> None:
        for i, r in enumerate(self.rows):
            if r is not None:
                self.stats["errors"] += 1
                _send(r.req, None, "error")
        self.rows, self.cache = [], None

    def _emit_token(self, req: Request, tok: int) -> str | None:
        """Hand `tok` to the client; returns the finish reason if the request is now done."""
        req.generated += 1
        self.stats["generated_tokens"] += 1
        if req.first_token_at is None:
            req.first_token_at = time.perf_counter()
        if tok in self.eos or tok in req.stop_ids:
            return "stop"  # the end-of-turn token itself is not part of the reply text
        _send(req, tok, None)
        return "length" if req.generated >= req.params.max_new_tokens else None

    # ------------------------------------------------------------------ admission (prefill)
    def _admit_all(self, joiners: list[Request]) -> None:
        """Prefill joiners in groups of similar length (left-padded, one forward per group)."""
        live = []
        for req in joiners:
            if req.cancelled:
                self._finish(req, "cancelled")
            else:
                live.append(req)
        live.sort(key=lambda r: len(r.prompt_ids))
        group: list[Request] = []
        for req in live:
            if group and (len(group) + 1) * len(req.prompt_ids) > PREFILL_TOKENS:
                self._prefill(group)
                group = []
            group.append(req)
        if group:
            self._prefill(group)

    def _prefill(self, reqs: list[Request]) -> None:
        dev = self.model.device
        lens = [len(r.prompt_ids) for r in reqs]
        J, P = len(reqs), max(lens)
        ids = torch.zeros(J, P, dtype=torch.long)
        valid = torch.zeros(J, P, dtype=torch.bool)
        for j, r in enumerate(reqs):  # left padding: every prompt ends at slot P-1
            ids[j, P - lens[j]:] = torch.tensor(r.prompt_ids)
            valid[j, P - lens[j]:] = True
        pos = (valid.long().cumsum(-1) - 1).clamp(min=0)
        for r in reqs:  # per-request RNG on the model's device (a CPU generator cannot draw CUDA numbers)
            r.generator = make_generator(r.params.seed, device=dev)
        pre = self.model.new_cache(J, P)
        mask = None if all(n == P for n in lens) else valid.to(dev)
        logits = self.model(ids.to(dev), positions=pos.to(dev), attn_mask=mask, cache=pre)[:, -1]
        self.stats["prefills"] += J
        self.stats["prefill_forwards"] += 1
        self.stats["prompt_tokens"] += sum(lens)
        toks = sample_next(logits, [r.params for r in reqs], [r.generator for r in reqs]).tolist()
        for j, (req, tok) in enumerate(zip(reqs, toks)):
            reason = self._emit_token(req, tok)
            if reason is None and lens[j] + req.generated >= self.max_context:
                reason = "length"
            if reason is not None:
                self._finish(req, reason)
                continue
            slot = self._free_slot()
            L = self._make_room_for_prompt(lens[j])
            for layer in range(len(pre.k)):
                self.cache.k[layer][slot, :, L - lens[j]:L] = pre.k[layer][j, :, P - lens[j]:]
                self.cache.v[layer][slot, :, L - lens[j]:L] = pre.v[layer][j, :, P - lens[j]:]
            self.rows[slot] = _Row(req, start=L - lens[j], pos=lens[j], next_token=tok)

    def _free_slot(self) -> int:
        for i, r in enumerate(self.rows):
            if r is None:
                return i
        B = len(self.rows)
        new_B = min(self.max_batch, max(1, 2 * B))
        if self.cache is None:
            self.cache = self.model.new_cache(new_B, 0)
        else:
            self._resize_rows(list(range(B)), new_B)
        self.rows += [None] * (new_B - B)
        return B

    def _resize_rows(self, keep: list[int], new_B: int) -> None:
        """Rebuild the cache with rows `keep` (in order) first, zero rows after, `new_B` rows in all."""
        c = self.cache
        for lst in (c.k, c.v):
            for i, t in enumerate(lst):
                n = torch.zeros((new_B,) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
                n[: len(keep)] = t[keep]
                lst[i] = n
        c.batch = new_B

    def _make_room_for_prompt(self, P: int) -> int:
        """Ensure the shared write position L >= P (shifting histories right if needed); returns L."""
        c = self.cache
        if self.running == 0:
            c.length = 0  # nobody's history is kept: restart the time axis
        L = c.length
        if P > L:
            self._set_time_axis(shift=P - L, cap=max(c.max_len, P + 1))
            for r in self.rows:
                if r is not None:
                    r.start += P - L
            c.length = P
        return c.length

    def _set_time_axis(self, shift: int, cap: int) -> None:
        """Move every history by `shift` slots (negative = left) into a time axis of `cap` slots."""
        c = self.cache
        L = c.length
        src0, dst0 = max(0, -shift), max(0, shift)
        n = L - src0
        for lst in (c.k, c.v):
            for i, t in enumerate(lst):
                if cap != t.shape[2] or shift > 0:
                    new = torch.zeros(t.shape[:2] + (cap,) + t.shape[3:], dtype=t.dtype, device=t.device)
                    new[:, :, dst0:dst0 + n] = t[:, :, src0:L]
                    lst[i] = new
                elif shift < 0:
                    t[:, :, :n] = t[:, :, src0:L].clone()
        c.max_len = cap
        c.length = dst0 + n

    # ------------------------------------------------------------------ decode
    def _drop_cancelled(self) -> None:
        for i, r in enumerate(self.rows):
            if r is not None and r.req.cancelled:
                self.rows[i] = None
                self._finish(r.req, "cancelled")
        self._maybe_shrink_rows()

    def _maybe_shrink_rows(self) -> None:
        active = [i for i, r in enumerate(self.rows) if r is not None]
        B = len(self.rows)
        if B > 1 and len(active) <= B // 4:
            new_B = max(1, 1 << max(0, (2 * len(active) - 1)).bit_length()) if active else 1
            self._resize_rows(active, new_B)
            self.rows = [self.rows[i] for i in active] + [None] * (new_B - len(active))

    def _room_for_one(self) -> None:
        c = self.cache
        oldest = min(r.start for r in self.rows if r is not None)
        wasted_half = oldest >= 64 and oldest > c.length // 2  # attention over dead slots costs time
        if c.length + 1 > c.max_len or wasted_half:
            span = c.length - oldest
            cap = c.max_len if span + 1 <= c.max_len else min(max(2 * c.max_len, 16), self.max_context + 1)
            self._set_time_axis(shift=-oldest, cap=max(cap, span + 1))
            for r in self.rows:
                if r is not None:
                    r.start -= oldest

    def _decode_step(self) -> None:
        self._room_for_one()
        c, dev = self.cache, self.model.device
        B, L = c.batch, c.length
        ids = torch.zeros(B, 1, dtype=torch.long)
        pos = torch.zeros(B, 1, dtype=torch.long)
        valid = torch.zeros(B, L + 1, dtype=torch.bool)
        active = [(i, r) for i, r in enumerate(self.rows) if r is not None]
        for i, r in active:
            ids[i, 0], pos[i, 0] = r.next_token, r.pos
            valid[i, r.start:] = True
        logits = self.model(ids.to(dev), positions=pos.to(dev), attn_mask=valid.to(dev), cache=c)[:, -1]
        self.stats["steps"] += 1
        self.stats["row_steps"] += len(active)
        self.stats["batched_steps"] += len(active) > 1
        self.stats["max_rows"] = max(self.stats["max_rows"], len(active))
        sel = torch.tensor([i for i, _ in active], device=dev)
        toks = sample_next(logits[sel], [r.req.params for _, r in active], [r.req.generator for _, r in active]).tolist()
        for (i, r), tok in zip(active, toks):
            r.pos += 1
            reason = self._emit_token(r.req, tok)
            if reason is None and len(r.req.prompt_ids) + r.req.generated >= self.max_context:
                reason = "length"
            if reason is not None:
                self.rows[i] = None
                self._finish(r.req, reason)
            else:
                r.next_token = tok
