"""One model interface for evaluation and prompting (survey §7.1 evaluation, §6 utilization).

Implements:
- `LM`: the text-level API every task and prompting strategy uses —
  `loglikelihood([(context, continuation)]) -> [(log p, is_greedy)]`, `loglikelihood_rolling(texts)` (sliding
  windows, for perplexity / bits per byte) and `generate(prompts, max_new_tokens, temperature, top_p, stop, seed)`;
- `TokenLM`: the shared tokenisation rules (lm-evaluation-harness's: trailing context spaces move to the
  continuation, the continuation is whole-string tokens minus context tokens, an empty context gets the
  BOS/EOS prefix token, long inputs are cut from the left);
- `LlmkitLM` for llmkit `Transformer`s: batched scoring that runs the prefix common to a batch's contexts
  (few-shot demos) once, each distinct context ONCE into the KV cache, then runs the continuations (multiple
  choice shares a context across choices) in buckets of similar length on copies of their contexts' cache rows,
  projecting vocabulary logits only at real continuation positions (HellaSwag's endings run 2 to 60+ tokens:
  padding every choice to the longest one cost a third of the work), whose logsumexp and argmax come from one
  native sweep (`llmkit.infer.native.logit_stats`, 3x PyTorch's passes); batched KV-cache generation, left padding;
- `HFLM` for transformers causal LMs (plain batched full-sequence scoring, `model.generate`).
The OpenAI-compatible HTTP endpoint adapter is `llmkit.eval.lm_openai.OpenAILM`.
"""
from __future__ import annotations

import math
import os
from typing import Callable, Sequence

import torch

from llmkit.infer.native import logit_stats

Pair = tuple[list[int], list[int]]
MIN_SHARED_PREFIX = 8  # tokens; a shorter common prefix is not worth its own forward call


class LM:
    """Text-level interface; subclasses implement the three methods."""

    name: str = "lm"
    num_params: int | None = None

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        raise NotImplementedError

    def loglikelihood_rolling(self, texts: Sequence[str]) -> list[tuple[float, int]]:
        """(sum log p of every token of the text, number of tokens) per text."""
        raise NotImplementedError

    def generate(self, prompts: Sequence[str], *, max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, stop: Sequence[str] | None = None, seed: int = 0) -> list[str]:
        raise NotImplementedError


def cut_at_stop(text: str, stop: Sequence[str] | None) -> tuple[str, bool]:
    """Text before the first stop string, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stop or ()) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class TokenLM(LM):
    """An LM with a local tokenizer; subclasses implement `score_pairs` and `generate_ids`."""

    batch_tokens = 4096  # scoring batch budget in tokens (rows x padded length); fits CPU caches well

    def __init__(self, tokenizer, max_length: int, prefix_token_id: int | None = None):
        self.tokenizer, self.max_length = tokenizer, int(max_length)
        eos = getattr(tokenizer, "eos_token_id", None)
        bos = getattr(tokenizer, "bos_token_id", None)
        self.eos_token_id = eos
        self.prefix_token_id = prefix_token_id if prefix_token_id is not None else (bos if bos is not None else eos)

    # ---- tokenisation
    def encode(self, text: str) -> list[int]:
        out = self.tokenizer.encode(text, add_special_tokens=False)
        return list(getattr(out, "ids", out))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def encode_pair(self, context: str, continuation: str) -> Pair:
        """lm-eval's `_encode_pair`: tokens of context+continuation split where the context's tokens end."""
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        if not context:
            return [self.prefix_token_id], self.encode(continuation)
        whole, ctx = self.encode(context + continuation), self.encode(context)
        return ctx, whole[len(ctx):]

    # ---- text API
    def loglikelihood(self, requests):
        return self.score_pairs([self.encode_pair(c, x) for c, x in requests])

    def loglikelihood_rolling(self, texts, stride: int | None = None):
        """Sliding windows of max_length tokens advancing by `stride` (default: max_length, disjoint windows);
        each window scores only tokens no earlier window scored, with the rest of the window as context
        (the HF perplexity recipe). The first token is conditioned on the prefix token."""
        out = []
        for text in texts:
            pairs = rolling_windows(self.encode(text), self.prefix_token_id, self.max_length, stride)
            scores = self.score_pairs(pairs)
            out.append((sum(s for s, _ in scores), sum(len(c) for _, c in pairs)))
        return out

    def truncate(self, ctx: list[int], cont: list[int]) -> Pair:
        """Cut the context from the left so that context + continuation fits max_length (+1: the last
        token is never fed)."""
        budget = self.max_length + 1 - len(cont)
        if budget < 1:
            raise ValueError(f"continuation of {len(cont)} tokens does not fit max_length={self.max_length}")
        return ctx[-budget:], cont

    def generate(self, prompts, *, max_new_tokens=64, temperature=0.0, top_p=1.0, stop=None, seed=0):
        ids = [self.encode(p)[-(self.max_length - max_new_tokens):] or [self.prefix_token_id] for p in prompts]
        texts: list[str] = []
        for start in range(0, len(ids), self.gen_batch):
            chunk = ids[start:start + self.gen_batch]
            outs = self.generate_ids(chunk, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                     seed=seed + start, stop_fn=lambda toks: cut_at_stop(self.decode(toks), stop)[1])
            texts += [cut_at_stop(self.decode(o), stop)[0] for o in outs]
        return texts

    gen_batch = 16

    def score_pairs(self, pairs: Sequence[Pair]) -> list[tuple[float, bool]]:
        raise NotImplementedError

    def generate_ids(self, prompts: list[list[int]], *, max_new_tokens: int, temperature: float, top_p: float,
                     seed: int, stop_fn: Callable[[list[int]], bool]) -> list[list[int]]:
        raise NotImplementedError


def rolling_windows(tokens: list[int], prefix_token: int, max_len: int, stride: int | None = None) -> list[Pair]:
    """(context, continuation) pairs covering every token once; see `TokenLM.loglikelihood_rolling`."""
    stride = stride or max_len
    if not 0 < stride <= max_len:
        raise ValueError(f"stride must be in 1..max_length={max_len}, got {stride}")
    seq = [prefix_token] + tokens
    pairs, done = [], 0  # `done` tokens of `tokens` already scored
    while done < len(tokens):
        end = min(done + stride, len(tokens)) if done else min(max_len, len(tokens))
        start = max(0, end + 1 - (max_len + 1))  # window over seq[start : end + 1] has <= max_len + 1 tokens
        window = seq[start:end + 1]
        n_new = end - done
        pairs.append((window[:-n_new], window[-n_new:]))
        done = end
    return pairs


def _logprobs_of(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(targets) [.., T] and whether each target is the argmax."""
    lp = logits.float().log_softmax(-1)
    return lp.gather(-1, targets.unsqueeze(-1)).squeeze(-1), lp.argmax(-1) == targets


def _target_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(target) per row of logits [N, V] and 1 where the target is not the argmax: logsumexp and argmax in
    one native sweep (no [N, V] log-softmax, no float copy of bfloat16 logits)."""
    lse, arg = logit_stats(logits)
    return logits.gather(-1, targets[:, None]).squeeze(-1).float() - lse, (arg != targets).to(torch.long)


def _greedy_or_sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator):
    from llmkit.infer.sampling import GenerationConfig, sample_next

    cfg = GenerationConfig(temperature=temperature if temperature > 0 else 1.0, top_p=top_p,
                           do_sample=temperature > 0)
    return sample_next(logits, cfg, gen)


class _ContextBatch:
    """What the continuation pass needs from a batch's context pass."""

    def __init__(self, cache, last: torch.Tensor, key_valid: torch.Tensor | None, next_pos: torch.Tensor):
        self.cache, self.last, self.key_valid, self.next_pos = cache, last, key_valid, next_pos


BUCKET_SLACK = 1.25  # padded / real continuation tokens allowed in one bucket (HellaSwag endings: 2 to 60+ tokens)
MIN_BUCKET = 8  # rows; a smaller bucket always takes the next row (tiny matmuls cost more than padding)


def length_buckets(rows: list, length: Callable, max_rows: int | None = None) -> list[list]:
    """Rows sorted by length (longest first) cut into buckets whose right padding stays within BUCKET_SLACK
    and that hold at most `max_rows` rows."""
    out: list[list] = []
    cur: list = []
    real = 0
    for r in sorted(rows, key=lambda r: -length(r)):
        n = length(r)
        full = max_rows is not None and len(cur) >= max_rows
        if cur and (full or len(cur) >= MIN_BUCKET and (len(cur) + 1) * length(cur[0]) > BUCKET_SLACK * (real + n)):
            out.append(cur)
            cur, real = [], 0
        cur.append(r)
        real += n
    if cur:
        out.append(cur)
    return out


class LlmkitLM(TokenLM):
    """A llmkit `Transformer` + tokenizer, scored with shared-context KV caching."""

    def __init__(self, model, tokenizer, *, max_length: int | None = None, name: str = "llmkit",
                 batch_tokens: int | None = None):
        super().__init__(tokenizer, max_length or model.cfg.max_seq_len)
        self.model, self.name = model.eval(), name
        self.num_params = sum(p.numel() for p in model.parameters())
        if batch_tokens:
            self.batch_tokens = batch_tokens
        if model.cfg.arch == "encoder_decoder":
            raise ValueError("LlmkitLM scores decoder-only models; an encoder_decoder model needs its own adapter")

    @torch.inference_mode()
    def score_pairs(self, pairs):
        pairs = [self.truncate(c, x) for c, x in pairs]
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (ctx, _) in enumerate(pairs):
            groups.setdefault(tuple(ctx), []).append(i)
        # longest first: padding waste shrinks and an out-of-memory shows up on the first batch
        order = sorted(groups, key=lambda c: -(len(c) + max(len(pairs[i][1]) for i in groups[c])))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
        batch: list[tuple[int, ...]] = []
        L = work_conts = 0
        for ctx in order:
            # work: every context once (padded to the batch's longest) + every continuation token (continuations
            # run in length buckets, so they are barely padded)
            L2, w2 = max(L, len(ctx)), work_conts + sum(len(pairs[i][1]) for i in groups[ctx])
            if batch and (len(batch) + 1) * L2 + w2 > self.batch_tokens:
                self._score_groups(batch, groups, pairs, results)
                batch, L2, w2 = [], len(ctx), sum(len(pairs[i][1]) for i in groups[ctx])
            batch.append(ctx)
            L, work_conts = L2, w2
        if batch:
            self._score_groups(batch, groups, pairs, results)
        return results

    def _score_groups(self, ctxs, groups, pairs, results) -> None:
        """The token prefix common to all contexts of the batch (few-shot demos, a task description) runs once;
        each context's remainder (left-padded after it) then runs once into the KV cache; the continuations,
        in buckets of similar length, then run on copies of their contexts' cache rows."""
        dev, m = self.model.device, self.model
        G = len(ctxs)
        P = len(os.path.commonprefix(ctxs)) if G > 1 else 0
        P = min(P, min(len(c) for c in ctxs) - 1)  # every context keeps a token of its own: its logits score
        if P < MIN_SHARED_PREFIX:
            P = 0
        sufs = [c[P:] for c in ctxs]
        L = max(len(x) for x in sufs)
        ids = torch.zeros(G, L, dtype=torch.long, device=dev)
        valid = torch.zeros(G, L, dtype=torch.bool, device=dev)
        for g, x in enumerate(sufs):
            ids[g, L - len(x):] = torch.tensor(x, device=dev)
            valid[g, L - len(x):] = True
        padded = not bool(valid.all())
        cache = m.new_cache(1 if P else G, P + L)
        if P:
            m(torch.tensor([ctxs[0][:P]], device=dev), cache=cache, return_hidden=True)
            cache.reorder(torch.zeros(G, dtype=torch.long, device=dev))
        key_valid = torch.cat([torch.ones(G, P, dtype=torch.bool, device=dev), valid], 1)
        pos = P + (valid.long().cumsum(1) - 1).clamp(min=0)
        # only the last context position needs vocabulary logits: project that one hidden state
        hidden = m(ids, positions=pos, attn_mask=key_valid if padded else None, cache=cache, return_hidden=True)
        last = m.project(hidden[:, -1])  # [G, V]
        ctx = _ContextBatch(cache, last, key_valid if padded else None, P + valid.sum(1))
        members = [(g, i) for g, c in enumerate(ctxs) for i in groups[c]]
        C = max(len(pairs[i][1]) for _, i in members)
        # each bucket copies its rows' cache: bound those copies to 8 batches' worth of token rows
        max_rows = max(1, 8 * self.batch_tokens // (P + L + C))
        for rows in length_buckets(members, lambda r: len(pairs[r[1]][1]), max_rows):
            self._score_continuations(ctx, rows, pairs, results)

    def _score_continuations(self, ctx: "_ContextBatch", rows: list[tuple[int, int]], pairs, results) -> None:
        """Score the continuations `rows` [(context row, pair index)] on a copy of their contexts' KV cache rows
        (right padding needs no mask: causal attention never lets a real token see a later pad). Vocabulary
        logits are projected for real positions only, and log p comes from logsumexp (no [N, V] log-softmax)."""
        dev, m = self.model.device, self.model
        conts = [pairs[i][1] for _, i in rows]
        R, C = len(rows), max(len(x) for x in conts)
        owner = torch.tensor([g for g, _ in rows], device=dev)
        tgt = torch.zeros(R, C, dtype=torch.long, device=dev)
        for r, x in enumerate(conts):
            tgt[r, :len(x)] = torch.tensor(x, device=dev)
        logits = [ctx.last.index_select(0, owner)]  # first continuation token of every row
        targets = [tgt[:, 0]]
        row_of = [torch.arange(R, device=dev)]
        if C > 1:
            n = ctx.cache.length
            sub = m.new_cache(R, n + C - 1)
            for dst, src in ((sub.k, ctx.cache.k), (sub.v, ctx.cache.v)):
                for layer, t in enumerate(src):
                    dst[layer][:, :, :n] = t[:, :, :n].index_select(0, owner)
            sub.length = n
            step_pos = ctx.next_pos[owner][:, None] + torch.arange(C - 1, device=dev)[None]
            mask = None
            if ctx.key_valid is not None:
                mask = torch.cat([ctx.key_valid[owner], torch.ones(R, C - 1, dtype=torch.bool, device=dev)], 1)
            hidden = m(tgt[:, :-1], positions=step_pos, attn_mask=mask, cache=sub, return_hidden=True)
            lens = torch.tensor([len(x) for x in conts], device=dev)
            keep = torch.arange(C - 1, device=dev)[None] < (lens - 1)[:, None]  # [R, C-1] real positions
            r_idx, t_idx = keep.nonzero(as_tuple=True)
            logits.append(m.project(hidden[r_idx, t_idx]))
            targets.append(tgt[r_idx, t_idx + 1])
            row_of.append(r_idx)
        lp, miss = zip(*(_target_logprobs(x, t) for x, t in zip(logits, targets)))
        lp, miss, rows_all = torch.cat(lp), torch.cat(miss), torch.cat(row_of)
        sums = torch.zeros(R, dtype=torch.float64, device=dev).index_add_(0, rows_all, lp.double())
        misses = torch.zeros(R, dtype=torch.long, device=dev).index_add_(0, rows_all, miss)
        for r, (_, i) in enumerate(rows):
            results[i] = (float(sums[r]), not bool(misses[r]))

    @torch.inference_mode()
    def generate_ids(self, prompts, *, max_new_tokens, temperature, top_p, seed, stop_fn):
        m, dev = self.model, self.model.device
        B, L = len(prompts), max(len(p) for p in prompts)
        ids = torch.zeros(B, L, dtype=torch.long, device=dev)
        valid = torch.zeros(B, L, dtype=torch.bool, device=dev)
        for b, p in enumerate(prompts):
            ids[b, L - len(p):] = torch.tensor(p, device=dev)
            valid[b, L - len(p):] = True
        padded = not bool(valid.all())
        pos = (valid.long().cumsum(1) - 1).clamp(min=0)
        cache = m.new_cache(B, L + max_new_tokens)
        hidden = m(ids, positions=pos, attn_mask=valid if padded else None, cache=cache, return_hidden=True)
        logits = m.project(hidden[:, -1])
        nxt = valid.sum(1)
        gen = torch.Generator(device=dev).manual_seed(seed)
        out: list[list[int]] = [[] for _ in range(B)]
        done = [False] * B
        for step in range(max_new_tokens):
            tok = _greedy_or_sample(logits, temperature, top_p, gen)
            for b in range(B):
                if not done[b]:
                    t = int(tok[b])
                    if t == self.eos_token_id:
                        done[b] = True
                    else:
                        out[b].append(t)
                        done[b] = stop_fn(out[b])
            if all(done) or step == max_new_tokens - 1:
                break
            valid = torch.cat([valid, torch.ones(B, 1, dtype=torch.bool, device=dev)], 1)
            logits = m(tok[:, None], positions=nxt[:, None], attn_mask=valid if padded else None, cache=cache)[:, -1]
            nxt = nxt + 1
        return out


class HFLM(TokenLM):
    """A transformers causal LM (+ its tokenizer): full-sequence batched scoring, `model.generate`."""

    def __init__(self, model, tokenizer, *, max_length: int | None = None, name: str = "hf"):
        cfg_len = getattr(model.config, "max_position_embeddings", None) or 2048
        super().__init__(tokenizer, max_length or cfg_len)
        self.model, self.name = model.eval(), name
        self.num_params = sum(p.numel() for p in model.parameters())

    @torch.inference_mode()
    def score_pairs(self, pairs):
        pairs = [self.truncate(c, x) for c, x in pairs]
        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
        dev = self.model.device
        i = 0
        while i < len(order):
            T = len(pairs[order[i]][0]) + len(pairs[order[i]][1]) - 1
            rows = order[i:i + max(1, self.batch_tokens // max(T, 1))]
            ids = torch.zeros(len(rows), T, dtype=torch.long, device=dev)
            for r, j in enumerate(rows):
                seq = (pairs[j][0] + pairs[j][1])[:-1]
                ids[r, :len(seq)] = torch.tensor(seq, device=dev)
            logits = self.model(ids).logits  # right padding: causal attention keeps real tokens exact
            for r, j in enumerate(rows):
                ctx, cont = pairs[j]
                s = len(ctx) - 1
                tgt = torch.tensor(cont, device=dev)
                lp, hit = _logprobs_of(logits[r, s:s + len(cont)], tgt)
                results[j] = (float(lp.double().sum()), bool(hit.all()))
            i += len(rows)
        return results

    @torch.inference_mode()
    def generate_ids(self, prompts, *, max_new_tokens, temperature, top_p, seed, stop_fn):
        dev, B, L = self.model.device, len(prompts), max(len(p) for p in prompts)
        pad = self.eos_token_id if self.eos_token_id is not None else 0
        ids = torch.full((B, L), pad, dtype=torch.long, device=dev)
        att = torch.zeros(B, L, dtype=torch.long, device=dev)
        for b, p in enumerate(prompts):
            ids[b, L - len(p):], att[b, L - len(p):] = torch.tensor(p), 1
        torch.manual_seed(seed)
        kw = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)
        out = self.model.generate(input_ids=ids, attention_mask=att, max_new_tokens=max_new_tokens,
                                  pad_token_id=pad, top_k=None, **kw)[:, L:]
        res = []
        for row in out.tolist():
            toks = []
            for t in row:
                if t == self.eos_token_id:
                    break
                toks.append(t)
            res.append(toks)
        return res


def bits_per_byte(sum_logprob: float, n_bytes: int) -> float:
    """-sum log p / (ln 2 * bytes): compares models with different tokenizers (the Pile's metric)."""
    return -sum_logprob / (math.log(2) * max(n_bytes, 1))
