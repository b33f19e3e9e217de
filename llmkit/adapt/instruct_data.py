"""Building and balancing instruction data (survey §5.1.1-5.1.2).

Implements:
- formatted instances: `ALPACA` templates (Stanford Alpaca's exact prompt), `task_prompt` (task description +
  demonstrations + input, FLAN/PromptSource style), `invert` (input/output inversion), `alpaca_messages`,
  `gsm8k_messages`, `hh_pairs` (HH-RLHF dialogues -> prompt / chosen / rejected);
- balancing: `mixture_rates` (examples-proportional with a cap K [T5, Raffel et al. 2020] and temperature
  sampling r ∝ r^(1/T)), `MixtureSampler` (resumable, seeded), `staged_schedule` (multi-stage tuning with an
  exact replay fraction of earlier stages) — pre-training documents mix in as one more source whose examples
  carry labels on every token (OPT-IML);
- synthetic data: `rouge_l` (LCS F-measure on tokens, the Self-Instruct filter), `self_instruct` (seed tasks ->
  generated instructions kept when ROUGE-L < 0.7 to every kept one [Wang et al. 2023]) and `evol_prompt`
  (Evol-Instruct in-depth / in-breadth rewriting prompts [Xu et al. 2023]);
- selection: `k_center` (greedy k-center on embeddings, diversity [Sener & Savarese 2018]) and `ifd_score`
  (instruction-following difficulty = PPL(response | instruction) / PPL(response) [Li et al. 2023]).
"""
from __future__ import annotations

import json
import math
import random
import re

import torch

ALPACA = {  # github.com/tatsu-lab/stanford_alpaca train.py PROMPT_DICT
    "prompt_input": (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"),
    "prompt_no_input": (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Response:\n"),
}


def alpaca_prompt(ex: dict) -> str:
    return ALPACA["prompt_input" if ex.get("input") else "prompt_no_input"].format(**ex)


def task_prompt(description: str, x: str, demos: list[tuple[str, str]] = (), in_label="Input", out_label="Output") -> str:
    """Task description, then k demonstrations, then the input (the instance format of survey Fig. 'formatted instance')."""
    parts = [description.strip(), ""]
    for dx, dy in demos:
        parts += [f"{in_label}: {dx}", f"{out_label}: {dy}", ""]
    parts += [f"{in_label}: {x}", f"{out_label}:"]
    return "\n".join(parts)


def invert(ex: dict, description: str = "Given the output, write an input that produces it.") -> dict:
    """Input/output inversion: a new task that maps the output back to the input."""
    return {"instruction": description, "input": ex["output"], "output": ex.get("input") or ex["instruction"]}


def alpaca_messages(ex: dict) -> list[dict]:
    user = ex["instruction"] + (f"\n\n{ex['input']}" if ex.get("input") else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": ex["output"]}]


def gsm8k_messages(ex: dict) -> list[dict]:
    """GSM8K worked solution; calculator notes <<a*b=c>> dropped, final line 'The answer is N.'."""
    body, _, final = ex["answer"].rpartition("####")
    steps = re.sub(r"<<[^>]*>>", "", body).strip()
    return [{"role": "user", "content": ex["question"]},
            {"role": "assistant", "content": f"{steps}\nThe answer is {final.strip()}."}]


def hh_pairs(chosen: str, rejected: str) -> dict:
    """Split two HH-RLHF dialogues at their last '\\n\\nAssistant:' into prompt / chosen / rejected."""
    key = "\n\nAssistant:"
    i = chosen.rfind(key)
    if i < 0:
        raise ValueError("an HH-RLHF dialogue has no '\\n\\nAssistant:' turn")
    prompt = chosen[: i + len(key)]
    if not rejected.startswith(prompt):
        j = rejected.rfind(key)
        return {"prompt": prompt, "chosen": chosen[i + len(key):], "rejected": rejected[j + len(key):]}
    return {"prompt": prompt, "chosen": chosen[len(prompt):], "rejected": rejected[len(prompt):]}


def read_jsonl(path) -> list[dict]:
    import gzip

    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        out = []
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not valid JSON ({e})") from e
        return out


# ---------------------------------------------------------------------------------------------- balancing
def mixture_rates(sizes: list[int], cap: int | None = None, temperature: float = 1.0) -> list[float]:
    """r_m = min(e_m, K) / sum_n min(e_n, K), then r ∝ r^(1/T) (T=1: proportional; T->inf: uniform)."""
    e = [min(s, cap) if cap else s for s in sizes]
    r = [x / sum(e) for x in e]
    r = [x ** (1.0 / temperature) for x in r]
    return [x / sum(r) for x in r]


class MixtureSampler:
    """Draws (source index, example) with the given rates; each source is shuffled and cycled; resumable."""

    def __init__(self, sources: list[list], rates: list[float], seed: int = 0):
        if len(sources) != len(rates) or any(len(s) == 0 for s in sources):
            raise ValueError("MixtureSampler needs one non-empty source per rate")
        self.sources, self.rates, self.seed = sources, rates, seed
        self.drawn = 0

    def state_dict(self) -> dict:
        return {"drawn": self.drawn}

    def load_state_dict(self, s: dict) -> None:
        self.drawn = s["drawn"]

    def _pick(self, i: int) -> tuple[int, object]:
        rng = random.Random(self.seed * 1000003 + i)
        src = rng.choices(range(len(self.sources)), weights=self.rates)[0]
        return src, self.sources[src][rng.randrange(len(self.sources[src]))]

    def __iter__(self):
        while True:
            out = self._pick(self.drawn)
            self.drawn += 1
            yield out


def staged_schedule(stage_sizes: list[int], replay: float) -> list[tuple[int, bool]]:
    """(stage, is_replay) for every example slot: stage k's slot i is a replay of earlier stages exactly when
    floor((i+1)*replay) > floor(i*replay), so each later stage holds round(n_k * replay) replay slots."""
    out = []
    for k, n in enumerate(stage_sizes):
        for i in range(n):
            rep = k > 0 and math.floor((i + 1) * replay) > math.floor(i * replay)
            out.append((k, rep))
    return out


# ---------------------------------------------------------------------------------------------- synthetic data
def _lcs(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def _words(s: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", s.lower())


def rouge_l(a: str, b: str) -> float:
    """ROUGE-L F1 on lower-cased word tokens (rouge_score's default tokenizer without stemming)."""
    x, y = _words(a), _words(b)
    if not x or not y:
        return 0.0
    lcs = _lcs(x, y)
    if lcs == 0:
        return 0.0
    p, r = lcs / len(y), lcs / len(x)
    return 2 * p * r / (p + r)


BLACKLIST = ("image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps", "draw",
             "plot", "go to", "video", "audio", "music", "flowchart", "diagram")  # Self-Instruct's filter list


def self_instruct(seed_tasks: list[str], generate, n_target: int, threshold: float = 0.7, n_seed_demos: int = 6,
                  n_machine_demos: int = 2, max_rounds: int = 100, seed: int = 0) -> list[str]:
    """Grow a pool of new instructions: prompt `generate(prompt) -> list[str]` with 8 demonstrations
    (6 human seed + 2 generated, as in the paper), keep candidates that pass the filters."""
    rng = random.Random(seed)
    pool, made = list(seed_tasks), []
    for _ in range(max_rounds):
        if len(made) >= n_target:
            break
        demos = rng.sample(seed_tasks, min(n_seed_demos, len(seed_tasks)))
        demos += rng.sample(made, min(n_machine_demos, len(made)))
        prompt = "Come up with a series of tasks:\n" + "".join(f"{i + 1}. {d}\n" for i, d in enumerate(demos))
        prompt += f"{len(demos) + 1}."
        for cand in generate(prompt):
            cand = cand.strip()
            words = _words(cand)
            if not (3 <= len(words) <= 150) or any(re.search(rf"\b{w}\b", cand.lower()) for w in BLACKLIST):
                continue
            if not cand[0].isalnum() or max(rouge_l(cand, p) for p in pool) >= threshold:
                continue
            pool.append(cand)
            made.append(cand)
            if len(made) >= n_target:
                break
    return made


EVOL_DEPTH = ("Add one more constraint or requirement to the prompt.", "Replace general concepts with more specific ones.",
              "If the prompt can be solved with a few simple steps, rewrite it to require multiple-step reasoning.",
              "Deepen the inquiry of the prompt.")


def evol_prompt(instruction: str, mode: str = "depth", method: int = 0) -> str:
    """The rewriting prompt of Evol-Instruct (in-depth: one of EVOL_DEPTH; in-breadth: a new rarer prompt)."""
    if mode == "depth":
        how = EVOL_DEPTH[method % len(EVOL_DEPTH)]
        return (f"Rewrite the given prompt into a more complex version. {how} The rewritten prompt must be "
                f"reasonable and answerable by humans.\n#Given Prompt#:\n{instruction}\n#Rewritten Prompt#:\n")
    if mode == "breadth":
        return ("Draw inspiration from the given prompt to create a brand new prompt in the same domain but rarer. "
                f"Keep a similar length and difficulty.\n#Given Prompt#:\n{instruction}\n#Created Prompt#:\n")
    raise ValueError(f"evol mode {mode!r}: choose depth or breadth")


# ---------------------------------------------------------------------------------------------- selection
def k_center(x: torch.Tensor, k: int, first: int = 0) -> list[int]:
    """Greedy k-center: repeatedly add the point farthest from the chosen set (a 2-approximation)."""
    chosen = [first]
    d = torch.cdist(x, x[first:first + 1]).squeeze(1)
    while len(chosen) < min(k, len(x)):
        i = int(d.argmax())
        chosen.append(i)
        d = torch.minimum(d, torch.cdist(x, x[i:i + 1]).squeeze(1))
    return chosen


@torch.no_grad()
def ifd_score(model, tokenizer, instruction: str, response: str) -> float:
    """PPL(response | instruction) / PPL(response): > 1 means the instruction does not help (harder)."""
    from .logprobs import token_logps

    def nll(prefix: list[int], target: list[int]) -> float:
        ids = torch.tensor([prefix + target], device=model.device)
        lp = token_logps(model(ids)[:, :-1], ids[:, 1:])[0, len(prefix) - 1:]
        return -lp.mean().item()

    bos = getattr(tokenizer, "bos_token_id", None)
    start = [bos] if bos is not None else [getattr(tokenizer, "eos_token_id", 0)]
    resp = list(tokenizer.encode(response, add_special_tokens=False))
    inst = list(tokenizer.encode(instruction, add_special_tokens=False))
    return math.exp(nll(start + inst, resp)) / math.exp(nll(start, resp))


# ---------------------------------------------------------------------------------------------- critique and revise
def critique_revise(generate, prompt: str, response: str, principles: list[str], rounds: int = 1) -> list[dict]:
    """Constitutional-AI style self-critique: for each principle, ask for a critique, then a revision
    [Bai et al. 2022]; returns the trace, whose last revision is the new SFT target."""
    trace = []
    for _ in range(rounds):
        for pr in principles:
            critique = generate(f"Prompt: {prompt}\nResponse: {response}\nCritique the response by this principle: {pr}\nCritique:")
            revised = generate(f"Prompt: {prompt}\nResponse: {response}\nCritique: {critique}\n"
                               f"Rewrite the response to address the critique.\nRevision:")
            trace.append({"principle": pr, "critique": critique, "revision": revised})
            response = revised
    return trace
