"""One model interface for evaluation and prompting (survey §7.1 evaluation, §6 utilization).

Implements:
- `LM`: the text-level API every task and prompting strategy uses —
  `loglikelihood([(context, continuation)]) -> [(log p, is_greedy)]`, `loglikelihood_rolling(texts)` (sliding
  windows, for perplexity / bits per byte) and `generate(prompts, max_new_tokens, temperature, top_p, stop, seed)`;
- `TokenLM`: the shared tokenisation rules (lm-evaluation-harness's: trailing context spaces move to the
  continuation, the continuation is whole-string tokens minus context tokens, an empty context gets the
  BOS/EOS prefix token, long inputs are cut from the left);
- `LlmkitLM` for llmkit `Transformer`s: exact scoring with each distinct context run ONCE for all of its
  continuations and items packed into rows under a tree attention mask (`llmkit.eval.packing`: real tokens
  only, a few-shot prefix common to every context run once); batched KV-cache generation, left padding;
- `HFLM` for transformers causal LMs (plain batched full-sequence scoring, `model.generate`).
The OpenAI-compatible HTTP endpoint adapter is `llmkit.eval.lm_openai.OpenAILM`.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from .packing import score_packed

Pair = tuple[list[int], list[int]]


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


def _greedy_or_sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator):
    from llmkit.infer.sampling import GenerationConfig, sample_next

    cfg = GenerationConfig(temperature=temperature if temperature > 0 else 1.0, top_p=top_p,
                           do_sample=temperature > 0)
    return sample_next(logits, cfg, gen)


class LlmkitLM(TokenLM):
    """A llmkit `Transformer` + tokenizer, scored by packed tree attention (`llmkit.eval.packing`)."""

    def __init__(self, model, tokenizer, *, max_length: int | None = None, name: str = "llmkit",
                 batch_tokens: int | None = None):
        super().__init__(tokenizer, max_length or model.cfg.max_seq_len)
        self.model, self.name = model.eval(), name
        self.num_params = sum(p.numel() for p in model.parameters())
        if batch_tokens:
            self.batch_tokens = batch_tokens
        if model.cfg.arch == "encoder_decoder":
            raise ValueError("LlmkitLM scores decoder-only models; an encoder_decoder model needs its own adapter")

    def score_pairs(self, pairs):
        return score_packed(self.model, [self.truncate(c, x) for c, x in pairs], self.batch_tokens, self.max_length)

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
