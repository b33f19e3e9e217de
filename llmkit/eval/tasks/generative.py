"""Generation tasks with answer extraction (survey §7.1.2 knowledge, §7.1.3 math) and language modelling (§7.1.1).

Implements:
- GSM8K (jsonl `{question, answer}`, gold after '####'): lm-eval's "Question: ...\nAnswer:" format with train
  demos; `--cot` swaps in the 8 chain-of-thought exemplars of Wei et al. (2022) ending "The answer is N.";
  scored by strict '####' / 'The answer is' extraction and by the flexible last-number rule;
- closed-book QA (NQ-open / TriviaQA style jsonl `{question, answer|answers: [..]}`): EM and F1, SQuAD-normalised;
- LAMBADA last-word accuracy (jsonl `{context, continuation}`; lm-eval's lambada_openai: greedy continuation);
- WikiText-2 perplexity: articles split at ' = Title = ' lines, rolling windows; token and word perplexity,
  bits per byte.
"""
from __future__ import annotations

from pathlib import Path

from ..metrics import exact_match, extract_answer_is, extract_gsm8k, extract_last_number, extract_number, f1_score
from .base import GenTask, MCTask, PerplexityTask, TaskDataError, read_jsonl

# Wei et al. (2022), Table 20: the 8 GSM8K chain-of-thought exemplars (used by lm-eval's gsm8k_cot too).
GSM8K_COT = [
    ("There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are done, there "
     "will be 21 trees. How many trees did the grove workers plant today?",
     "There are 15 trees originally. Then there were 21 trees after some more were planted. So there must have been "
     "21 - 15 = 6.", "6"),
    ("If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
     "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5.", "5"),
    ("Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?",
     "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After eating 35, "
     "they had 74 - 35 = 39.", "39"),
    ("Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops did Jason "
     "give to Denny?", "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny "
     "20 - 12 = 8.", "8"),
    ("Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he have now?",
     "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. 5 + 4 = 9.",
     "9"),
    ("There were nine computers in the server room. Five more computers were installed each day, from monday to "
     "thursday. How many computers are now in the server room?",
     "There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = 20 computers "
     "were added. 9 + 20 is 29.", "29"),
    ("Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How many golf "
     "balls did he have at the end of wednesday?", "Michael started with 58 golf balls. After losing 23 on tuesday, "
     "he had 58 - 23 = 35. After losing 2 more, he had 35 - 2 = 33 golf balls.", "33"),
    ("Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
     "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 dollars "
     "left. 23 - 15 is 8.", "8"),
]


def cot_demos_text(examples) -> str:
    """Few-shot CoT prompt: 'Q: ...\\nA: <rationale> The answer is N.' blocks, blank-line separated."""
    return "".join(f"Q: {q}\nA: {r} The answer is {a}.\n\n" for q, r, a in examples)


def gsm8k_score(pred_text: str | None, doc: dict) -> dict[str, float]:
    gold = extract_gsm8k(doc["answer"])
    text = pred_text or ""
    strict = extract_gsm8k(text) or extract_answer_is(text)
    return {"exact_match": float(strict == gold), "flexible_match": float(extract_last_number(text) == gold)}


def gsm8k(data: Path) -> GenTask:
    f = data / "gsm8k" / "test.jsonl"
    train = data / "gsm8k" / "train.jsonl"
    return GenTask("gsm8k", default_fewshot=5, loader=lambda: read_jsonl(f, ("question", "answer")),
                   fewshot_loader=lambda: read_jsonl(train, ("question", "answer")),
                   text_fn=lambda d: "Question: " + d["question"] + "\nAnswer:",
                   answer_fn=lambda d: extract_gsm8k(d["answer"]), extract_fn=extract_number,
                   score_fn=lambda text, d: gsm8k_score(text, d),
                   stop=["Question:", "\n\n", "</s>", "<|im_end|>"], cot_demos=cot_demos_text(GSM8K_COT))


def read_qa(path: Path) -> list[dict]:
    docs = read_jsonl(path, ("question",))
    for n, d in enumerate(docs, 1):
        a = d.get("answers", d.get("answer"))
        if a is None:
            raise TaskDataError(f"{path}: record {n} has no 'answer' or 'answers' field")
        d["answers"] = [a] if isinstance(a, str) else list(a)
    return docs


def first_line(text: str) -> str:
    return text.strip().split("\n")[0].strip()


def closed_book_qa(path: Path, name: str = "cbqa") -> GenTask:
    return GenTask(name, loader=lambda: read_qa(path), text_fn=lambda d: "Q: " + d["question"] + "\nA:",
                   target_fn=lambda d: d["answers"][0], answer_fn=lambda d: d["answers"][0],
                   extract_fn=first_line, stop=["\n"], max_new_tokens=32,
                   score_fn=lambda text, d: {"exact_match": exact_match(first_line(text), d["answers"]),
                                             "f1": f1_score(first_line(text), d["answers"])})


def lambada(data: Path) -> GenTask:
    """Last-word accuracy: the continuation is the target word; greedy decoding of the whole word counts (lm-eval
    scores `is_greedy` of ' word', which `harness` computes through `loglikelihood`)."""
    f = data / "lambada" / "lambada_openai.jsonl"
    return MCTask("lambada", kind="lastword", loader=lambda: read_jsonl(f, ("context", "continuation")),
                  text_fn=lambda d: d["context"], choices_fn=lambda d: [d["continuation"]], gold_fn=lambda d: 0)


def read_wikitext_articles(path: Path) -> list[str]:
    """Articles of wiki.*.raw: a top-level heading line ' = Title = ' starts each one (sub-headings have ' = = ')."""
    path = Path(path)
    if not path.exists():
        raise TaskDataError(f"{path}: file not found")
    text = path.read_text(encoding="utf-8").replace("\r\n", "\n")
    articles, cur = [], []
    for line in text.split("\n"):
        if line.startswith(" = ") and not line.startswith(" = = ") and line.rstrip().endswith(" =") and cur:
            articles.append("\n".join(cur).strip("\n"))
            cur = []
        cur.append(line)
    if cur:
        articles.append("\n".join(cur).strip("\n"))
    return [a for a in articles if a.strip()]


def wikitext(data: Path) -> PerplexityTask:
    f = data / "wikitext-2" / "raw" / "wiki.test.raw"
    return PerplexityTask("wikitext", loader=lambda: read_wikitext_articles(f))
