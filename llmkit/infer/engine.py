"""The generation engine of survey §4.2.4 (checklist C13): KV-cached, batched, streaming decoding.

Implements:
- `generate(model, tokenizer, prompts, cfg, stream=...)`: prompts of different lengths in one batch
  (left padding + key mask + per-row positions, one preallocated `KVCache` for prompt + new tokens),
  greedy / sampled decoding through `sampling.sample_next`, EOS and stop strings, seeds, streaming of
  text deltas (an iterator, or a callback), beam search (`beam.py`) and speculative decoding with a
  draft model (`speculative.py`) behind the same call;
- `decode_tokens`: the token-level loop (no tokenizer), rows that finish drop out of the batch;
- `TextStream`: incremental detokenisation that never emits half a UTF-8 character and holds back
  text that could still become a stop string;
- `sequence_logprob`: log p(completion | prompt), for checks and scoring.

Only the last position is projected to the vocabulary after the prompt (`return_hidden`): on a long
prompt the [T, V] projection would otherwise cost more than the whole decode step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from .sampling import GenerationConfig, make_generator, sample_next

StreamCallback = Callable[[int, str], None]


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    prompt_tokens: int
    score: float | None = None  # beam search: the length-penalised sum of log-probs


# --------------------------------------------------------------------------- text
class TextStream:
    """Token ids in, safe text deltas out, for one sequence.

    Decodes a sliding window (prefix_offset..end) and emits only text beyond the window's already
    decoded part, as text-generation-inference does: a window ending in U+FFFD is an incomplete
    multi-byte character and waits for the next token. Stop strings cut the text and end the stream;
    a tail that could still grow into a stop string is held back until it cannot.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tok, self.stop = tokenizer, [s for s in stop if s]
        self.ids: list[int] = []
        self.text, self.sent = "", 0
        self.prefix_offset = self.read_offset = 0
        self.stopped = False

    def push(self, token: int) -> str:
        """Add one token; return the newly final text (possibly empty)."""
        if self.stopped:
            return ""
        self.ids.append(int(token))
        prefix = self.tok.decode(self.ids[self.prefix_offset:self.read_offset])
        full = self.tok.decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.text += full[len(prefix):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            self._check_stop()
        return self._release()

    def finish(self) -> str:
        """The rest of the text at the end of generation (an incomplete character is decoded as is)."""
        if not self.stopped and self.read_offset < len(self.ids):
            prefix = self.tok.decode(self.ids[self.prefix_offset:self.read_offset])
            self.text += self.tok.decode(self.ids[self.prefix_offset:])[len(prefix):]
            self.read_offset = len(self.ids)
            self._check_stop()
        delta = self.text[self.sent:]
        self.sent = len(self.text)
        return delta

    def _check_stop(self) -> None:
        if not self.stop:
            return
        longest = max(len(s) for s in self.stop)
        start = max(0, self.sent - longest)  # a stop string may straddle text already sent
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[:min(hits)], True

    def _release(self) -> str:
        hold = 0
        if not self.stopped:
            for s in self.stop:  # longest text suffix that is a proper prefix of a stop string
                for k in range(min(len(s) - 1, len(self.text)), hold, -1):
                    if self.text.endswith(s[:k]):
                        hold = k
                        break
        end = max(self.sent, len(self.text) - hold)
        delta = self.text[self.sent:end]
        self.sent = end
        return delta


# --------------------------------------------------------------------------- tokens
class Batch:
    """A left-padded batch in one preallocated KV cache.

    valid [B, L]: key mask over cache slots (False on padding); pos [B]: the position id of the next
    token of each row; hist [B, L]: the token in each slot (-1 on padding), read by the penalties.
    `padded` is False when no row has padding, so the model may take its unmasked fast paths.
    """

    def __init__(self, model, prompts: list[list[int]], room: int):
        if any(len(p) == 0 for p in prompts):
            raise ValueError("an empty prompt has nothing to condition on; give at least one token (e.g. BOS)")
        self.model = model
        self.enc = None
        if model.cfg.arch == "encoder_decoder":  # prompts feed the encoder; the decoder starts from one token
            self.enc = _encoder_batch(prompts, model.device)
            prompts = [[_decoder_start(model.cfg)]] * len(prompts)
        B, P = len(prompts), max(len(p) for p in prompts)
        L = P + room
        limit = model.cfg.max_seq_len
        if model.cfg.pos == "learned" and L > limit:
            raise ValueError(f"prompt ({P}) + new tokens ({room}) exceed the model's {limit} learned positions; "
                             "shorten the prompt or lower max_new_tokens")
        dev = model.device
        self.hist = torch.full((B, L), -1, dtype=torch.long, device=dev)
        self.valid = torch.zeros(B, L, dtype=torch.bool, device=dev)
        for i, p in enumerate(prompts):
            self.hist[i, P - len(p):P] = torch.tensor(p, dtype=torch.long)
            self.valid[i, P - len(p):P] = True
        self.valid[:, P:] = True
        self.padded = any(len(p) != P for p in prompts)
        self.length, self.rows = P, list(range(B))  # rows: batch row -> index of the original prompt
        self.cache = model.new_cache(B, L)
        self.fast = model.__dict__.get("fast_decoder")  # fused.enable_fast_decode attaches it
        self.pos = self.valid[:, :P].sum(1)

    def prefill(self) -> torch.Tensor:
        """Run the prompts; logits [B, V] for the first new token."""
        P = self.length
        ids = self.hist[:, :P].clamp(min=0)
        positions = (self.valid[:, :P].cumsum(1) - 1).clamp(min=0)
        mask = self.valid[:, :P] if self.padded else None
        if self.fast is not None:
            return self.fast(ids, positions=positions, attn_mask=mask, cache=self.cache)
        h = self.model(ids, positions=positions, attn_mask=mask, cache=self.cache, return_hidden=True,
                       **self._encoder_args(first=True))
        return self.model.project(h[:, -1])

    def _encoder_args(self, first: bool = False) -> dict:
        """Encoder-decoder: the encoder runs once (its cross-attention keys/values are cached); every step
        still needs the encoder's padding mask."""
        if self.enc is None:
            return {}
        ids, mask = self.enc
        return {"encoder_input_ids": ids, "encoder_attn_mask": mask} if first else {"encoder_attn_mask": mask}

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append tokens [B] and return logits [B, V] for the next ones."""
        t = self.length
        self.hist[:, t] = tokens
        mask = self.valid[:, :t + 1] if self.padded else None
        if self.fast is not None:
            logits = self.fast(tokens[:, None], positions=self.pos[:, None], attn_mask=mask, cache=self.cache)
        else:
            logits = self.model(tokens[:, None], positions=self.pos[:, None], attn_mask=mask, cache=self.cache,
                                **self._encoder_args())[:, -1]
        self.pos = self.pos + 1
        self.length = t + 1
        return logits

    def keep(self, index: list[int]) -> None:
        """Keep only these batch rows (finished sequences leave the batch)."""
        idx = torch.tensor(index, device=self.hist.device)
        self.cache.reorder(idx)
        self.hist, self.valid, self.pos = self.hist[idx], self.valid[idx], self.pos[idx]
        if self.enc is not None:
            self.enc = (self.enc[0][idx], self.enc[1][idx])
        self.rows = [self.rows[i] for i in index]
        self.padded = bool((~self.valid[:, :self.length]).any())

    def history(self) -> torch.Tensor:
        return self.hist[:, :self.length]


def _encoder_batch(prompts: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded encoder ids and their key mask (the encoder is bidirectional: the side does not matter)."""
    S = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), S, dtype=torch.long, device=device)
    mask = torch.zeros(len(prompts), S, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        ids[i, :len(p)] = torch.tensor(p, dtype=torch.long)
        mask[i, :len(p)] = True
    return ids, mask


def _decoder_start(cfg) -> int:
    """The decoder's first token: decoder_start_token_id, else pad (T5's convention), else BOS."""
    for t in (cfg.decoder_start_token_id, cfg.pad_token_id, cfg.bos_token_id):
        if t is not None:
            return int(t)
    raise ValueError("an encoder-decoder model needs decoder_start_token_id (or pad/bos) in its config to generate")


def _needs_history(cfg: GenerationConfig) -> bool:
    return cfg.repetition_penalty != 1.0 or cfg.frequency_penalty != 0.0 or cfg.presence_penalty != 0.0 \
        or cfg.no_repeat_ngram_size > 0


@torch.inference_mode()
def decode_tokens(
    model,
    prompts: list[list[int]],
    cfg: GenerationConfig,
    eos_ids: Sequence[int] = (),
    generator: torch.Generator | None = None,
    done: list[bool] | None = None,
) -> Iterator[list[tuple[int, int]]]:
    """Yield, after each step, [(prompt_index, token), ...] for the rows still running.

    A row stops after EOS (which is yielded), after max_new_tokens, or when the caller sets
    done[prompt_index] = True between steps (stop strings). Finished rows leave the batch once a
    quarter of it has finished, so a long straggler does not pay for the whole batch.
    """
    done = done if done is not None else [False] * len(prompts)
    if cfg.max_new_tokens == 0 or not prompts:
        return
    eos = torch.tensor(sorted(set(eos_ids)) or [-1], device=model.device)
    batch = Batch(model, prompts, cfg.max_new_tokens)
    logits = batch.prefill()
    history = _needs_history(cfg)
    for step in range(cfg.max_new_tokens):
        tokens = sample_next(logits, cfg, generator, batch.history() if history else None)
        toks = tokens.tolist()
        yield [(r, t) for r, t in zip(batch.rows, toks) if not done[r]]
        for r, hit in zip(batch.rows, torch.isin(tokens, eos).tolist()):
            done[r] = done[r] or hit
        live = [i for i, r in enumerate(batch.rows) if not done[r]]
        if not live or step == cfg.max_new_tokens - 1:
            return
        if len(live) <= 0.75 * len(batch.rows):
            batch.keep(live)
            tokens = tokens[live]
        logits = batch.step(tokens)


# --------------------------------------------------------------------------- text-level API
def _encode(tokenizer, prompts, add_special_tokens: bool) -> list[list[int]]:
    out = []
    for p in prompts:
        if isinstance(p, str):
            if tokenizer is None:
                raise ValueError("text prompts need a tokenizer; pass token ids (list[int]) to generate without one")
            ids = tokenizer.encode(p, add_special_tokens=add_special_tokens)
            if not ids and getattr(tokenizer, "bos_token_id", None) is not None:
                ids = [tokenizer.bos_token_id]
            out.append(ids)
        else:
            out.append([int(t) for t in p])
    return out


def stream_generate(
    model,
    tokenizer,
    prompts: str | Sequence[str] | Sequence[Sequence[int]],
    cfg: GenerationConfig | None = None,
    *,
    draft_model=None,
    add_special_tokens: bool = True,
    results: list | None = None,
    **overrides,
) -> Iterator[tuple[int, str]]:
    """Yield (prompt_index, text_delta) as tokens arrive; fills `results` with Completions at the end."""
    cfg = (cfg or GenerationConfig()).updated(**overrides) if overrides else (cfg or GenerationConfig())
    single = isinstance(prompts, str) or (len(prompts) > 0 and isinstance(prompts[0], int))
    ids = _encode(tokenizer, [prompts] if single else list(prompts), add_special_tokens)
    eos = cfg.eos_ids(getattr(tokenizer, "eos_token_id", None))
    gen = make_generator(cfg.seed, model.device)
    if model.cfg.arch == "encoder_decoder" and (cfg.num_beams > 1 or draft_model is not None):
        raise ValueError("beam search and speculative decoding cover decoder-only models; generate from an "
                         "encoder-decoder model with greedy or sampled decoding (num_beams=1, no draft_model)")
    if cfg.num_beams > 1:
        from .beam import beam_search

        finals = [beam_search(model, p, cfg, eos) for p in ids]
        outs = [(toks, score) for toks, score in finals]
        steps: Iterator = iter([[(i, t) for i, (toks, _) in enumerate(outs) for t in toks]])
    else:
        outs = None
        done = [False] * len(ids)
        if draft_model is not None:
            from .speculative import speculative_decode

            if len(ids) != 1:
                raise ValueError("speculative decoding runs one prompt at a time; loop over prompts or drop draft_model")
            steps = ([(0, t)] for t in speculative_decode(model, draft_model, ids[0], cfg, eos, gen, done))
        else:
            steps = decode_tokens(model, ids, cfg, eos, gen, done)
    streams = [TextStream(tokenizer, cfg.stop) if tokenizer is not None else None for _ in ids]
    toks_out: list[list[int]] = [[] for _ in ids]
    reason = ["length"] * len(ids)
    eos_set = set(eos)
    for events in steps:
        for i, t in events:
            if reason[i] == "stop":
                continue
            toks_out[i].append(t)
            if t in eos_set:
                reason[i] = "stop"
                continue
            if streams[i] is not None:
                delta = streams[i].push(t)
                if delta:
                    yield i, delta
                if streams[i].stopped:
                    reason[i] = "stop"
                    if outs is None:
                        done[i] = True
    for i, s in enumerate(streams):
        if s is not None:
            delta = s.finish()
            if delta:
                yield i, delta
    if results is not None:
        for i, p in enumerate(ids):
            text = streams[i].text if streams[i] is not None else ""
            score = outs[i][1] if outs is not None else None
            results.append(Completion(text, toks_out[i], reason[i], len(p), score))


def generate(
    model,
    tokenizer,
    prompts: str | Sequence[str] | Sequence[Sequence[int]],
    cfg: GenerationConfig | None = None,
    *,
    stream: StreamCallback | bool | None = None,
    draft_model=None,
    add_special_tokens: bool = True,
    **overrides,
):
    """Generate for one prompt (returns a Completion) or a list of prompts (returns a list).

    prompts: text (needs a tokenizer) or token ids. cfg: a GenerationConfig; keyword overrides such as
    max_new_tokens=32, temperature=0 are applied on top. stream=True returns an iterator of
    (prompt_index, text_delta); stream=callable(prompt_index, text_delta) is called as text arrives.
    draft_model: speculative decoding (one prompt). cfg.num_beams > 1: beam search.
    """
    single = isinstance(prompts, str) or (len(prompts) > 0 and isinstance(prompts[0], int))
    results: list[Completion] = []
    it = stream_generate(model, tokenizer, prompts, cfg, draft_model=draft_model,
                         add_special_tokens=add_special_tokens, results=results, **overrides)
    if stream is True:
        return it
    for i, delta in it:
        if callable(stream):
            stream(i, delta)
    return results[0] if single else results


@torch.inference_mode()
def sequence_logprob(model, prompt: Sequence[int], completion: Sequence[int]) -> float:
    """log p(completion | prompt) under the model (no warping), summed over the completion tokens."""
    ids = torch.tensor([list(prompt) + list(completion)], device=model.device)
    logp = model(ids)[0, len(prompt) - 1:-1].float().log_softmax(-1)
    return float(logp.gather(-1, ids[0, len(prompt):, None]).sum())


__all__ = ["Completion", "GenerationConfig", "TextStream", "Batch", "decode_tokens", "generate", "stream_generate",
           "sequence_logprob"]
