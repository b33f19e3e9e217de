"""SFT data: role masks, packing = unpacked, templates, mixing, stages, Self-Instruct filter, selection; resumable loader."""
import math

import pytest
import torch

from llmkit.adapt import instruct_data as idata
from llmkit.adapt import sft
from llmkit.adapt.logprobs import IGNORE

CHAT = [{"role": "system", "content": "You add numbers."}, {"role": "user", "content": "What is 2+3?"},
        {"role": "assistant", "content": "2+3 = 5. The answer is 5."},
        {"role": "user", "content": "Use the tool for 7*8."},
        {"role": "assistant", "content": "calc(7*8)"}, {"role": "tool", "content": "56"},
        {"role": "assistant", "content": "The answer is 56."}]


@pytest.fixture(scope="module")
def tok():
    from llmkit.tokenizer.train import train_tokenizer

    text = [" ".join(m["content"] for m in CHAT) * 3, "the quick brown fox jumps over the lazy dog " * 20,
            "What is 12 plus 30? The answer is 42. " * 10]
    return train_tokenizer(text, None, vocab_size=400, chat_template="chatml", min_frequency=1)


def test_chat_labels_only_on_assistant_turns(tok):
    ex = sft.tokenize_chat(tok, CHAT)
    full = tok.apply_chat_template(CHAT, add_generation_prompt=False, tokenize=False)
    assert tok.decode(ex["input_ids"], skip_special_tokens=False) == full
    trained = [i for i, l in zip(ex["input_ids"], ex["labels"]) if l != IGNORE]
    text = tok.decode(trained, skip_special_tokens=False)
    assert text == "2+3 = 5. The answer is 5.<|im_end|>\ncalc(7*8)<|im_end|>\nThe answer is 56.<|im_end|>\n"
    for bad in ("You add numbers", "What is 2+3", "Use the tool", "56<|im_end|>\n<|im_start|>assistant"):
        assert bad not in text
    assert all(l == IGNORE or l == i for i, l in zip(ex["input_ids"], ex["labels"]))
    with pytest.raises(ValueError, match="role"):
        sft.tokenize_chat(tok, [{"role": "robot", "content": "x"}])


def test_alpaca_template_golden():
    ex = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
    assert idata.alpaca_prompt(ex) == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nAdd the numbers.\n\n"
        "### Input:\n2 and 3\n\n### Response:\n")
    assert idata.alpaca_prompt({"instruction": "Say hi."}).endswith("### Instruction:\nSay hi.\n\n### Response:\n")
    assert idata.task_prompt("Reverse the word.", "abc", [("xy", "yx")]) == \
        "Reverse the word.\n\nInput: xy\nOutput: yx\n\nInput: abc\nOutput:"
    inv = idata.invert(ex)
    assert inv["input"] == "5" and inv["output"] == "2 and 3"


def test_real_sets_format(shared_data):
    import json

    alpaca = json.loads((shared_data / "alpaca" / "alpaca_data_1k.json").read_text())
    assert idata.alpaca_messages(alpaca[0])[1]["content"] == alpaca[0]["output"]
    gsm = idata.read_jsonl(shared_data / "gsm8k" / "train.jsonl")[:5] if (shared_data / "gsm8k" / "train.jsonl").exists() \
        else idata.read_jsonl(next((shared_data / "gsm8k").rglob("*train*.jsonl")))[:5]
    msg = idata.gsm8k_messages(gsm[0])
    assert "<<" not in msg[1]["content"] and msg[1]["content"].endswith(f"The answer is {gsm[0]['answer'].split('####')[-1].strip()}.")
    pairs = idata.read_jsonl(next((shared_data / "hh-rlhf").rglob("*.jsonl.gz")))[:20]
    for p in pairs:
        s = idata.hh_pairs(p["chosen"], p["rejected"])
        assert p["chosen"] == s["prompt"] + s["chosen"]


def test_packed_losses_equal_unpacked(tiny):
    g = torch.Generator().manual_seed(0)
    exs = []
    for n in (5, 9, 3, 12, 7, 4):
        ids = torch.randint(4, 90, (n,), generator=g).tolist()
        k = n // 2
        exs.append({"input_ids": ids, "labels": [IGNORE] * k + ids[k:]})
    bins = sft.pack(exs, seq_len=16)
    assert all(sum(len(e["input_ids"]) for e in b) <= 16 for b in bins) and len(bins) < len(exs)
    packed = sft.collate(bins, pad_id=0, seq_len=16)
    unpacked = sft.collate(exs, pad_id=0)
    assert "doc_ids" in packed and "doc_ids" not in unpacked
    with torch.no_grad():
        lp = sorted(sft.per_example_losses(tiny, packed))
        lu = sorted(sft.per_example_losses(tiny, unpacked))
    assert len(lp) == len(exs)
    torch.testing.assert_close(torch.tensor(lp), torch.tensor(lu), atol=1e-5, rtol=1e-5)
    # the trainer's token-mean loss over the same examples is equal too, and so is our head-on-labels-only loss
    from llmkit.adapt.logprobs import sft_loss
    from llmkit.train.objectives import lm_loss

    with torch.no_grad():
        ref = lm_loss(tiny, unpacked)[0]
        torch.testing.assert_close(lm_loss(tiny, packed)[0], ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sft_loss(tiny, packed)[0], ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sft_loss(tiny, unpacked)[0], ref, atol=1e-5, rtol=1e-5)


def test_loader_resumes_exactly():
    exs = [{"input_ids": list(range(4, 4 + n)), "labels": list(range(4, 4 + n))} for n in range(3, 13)]
    a = sft.SFTLoader(exs, batch_size=3, seed=1)
    it = iter(a)
    for _ in range(5):
        next(it)
    state = a.state_dict()
    want = [next(it)["input_ids"] for _ in range(3)]
    b = sft.SFTLoader(exs, batch_size=3, seed=1)
    b.load_state_dict(state)
    got = [x["input_ids"] for x, _ in zip(iter(b), range(3))]
    assert all(torch.equal(x, y) for x, y in zip(want, got))


def test_mixture_rates_and_sampler_chi_square():
    sizes = [100000, 20000, 500]
    rates = idata.mixture_rates(sizes, cap=30000)
    assert rates == pytest.approx([30000 / 50500, 20000 / 50500, 500 / 50500])
    t = idata.mixture_rates(sizes, temperature=2.0)
    raw = [s / sum(sizes) for s in sizes]
    assert t == pytest.approx([math.sqrt(r) / sum(math.sqrt(x) for x in raw) for r in raw])
    sampler = idata.MixtureSampler([list(range(s)) for s in (50, 20, 5)], rates, seed=0)
    n = 20000
    counts = [0, 0, 0]
    for (src, _), _ in zip(sampler, range(n)):
        counts[src] += 1
    chi2 = sum((c - n * r) ** 2 / (n * r) for c, r in zip(counts, rates))
    assert chi2 < 13.8  # chi-square, 2 degrees of freedom, p = 0.001


def test_staged_schedule_replay_exact():
    sched = idata.staged_schedule([100, 200, 50], replay=0.1)
    assert [s for s, _ in sched] == [0] * 100 + [1] * 200 + [2] * 50
    assert sum(r for s, r in sched if s == 0) == 0
    assert sum(r for s, r in sched if s == 1) == 20 and sum(r for s, r in sched if s == 2) == 5


def test_rouge_l_and_self_instruct_with_scripted_generator():
    assert idata.rouge_l("the cat sat on the mat", "the cat sat on the mat") == 1.0
    assert idata.rouge_l("a b c d", "x y z") == 0.0
    # LCS("the cat sat on the mat", "the cat lay on a mat") = the cat on mat = 4; P = R = 4/6
    assert idata.rouge_l("the cat sat on the mat", "the cat lay on a mat") == pytest.approx(4 / 6)
    seeds = ["Write a poem about the sea.", "Summarize the following article in two sentences.",
             "Translate the sentence into French.", "List three prime numbers greater than ten.",
             "Explain why the sky is blue.", "Give a synonym for the word happy.", "Sort these words alphabetically."]
    script = iter([
        ["Write a poem about the sea.", "Write a short poem about the sea.", "Draw a picture of a cat.",
         "Compute the sum of two integers given as input."],
        ["Compute the sum of two given integers.", "Name the capital city of a given country.", "ok"],
        ["Classify the sentiment of a movie review as positive or negative."],
    ] + [[]] * 100)
    prompts = []

    def generate(prompt):
        prompts.append(prompt)
        return next(script)

    made = idata.self_instruct(seeds, generate, n_target=3, seed=0)
    assert made == ["Compute the sum of two integers given as input.", "Name the capital city of a given country.",
                    "Classify the sentiment of a movie review as positive or negative."]
    assert prompts[1].count("\n") >= 8  # 6 seed + up to 2 machine demonstrations
    assert "#Given Prompt#" in idata.evol_prompt("Add 2 and 3.", "depth", 2)


def test_k_center():
    pts = torch.tensor([[0.0, 0.0], [0.1, 0.0], [10.0, 0.0], [0.0, 10.0], [10.1, 10.0], [5.0, 5.0]])
    chosen = idata.k_center(pts, 4)
    best = max((min(torch.dist(pts[a], pts[b]).item() for a in c for b in c if a < b), c)
               for c in __import__("itertools").combinations(range(6), 4) if 0 in c)
    got = min(torch.dist(pts[a], pts[b]).item() for a in chosen for b in chosen if a < b)
    assert got >= best[0] / 2 and set(chosen) == {0, 2, 3, 4}


def test_ifd_ranks_shuffled_response_harder():
    """A tiny LM trained for a few steps on 'question -> answer' pairs: the IFD of a shuffled response is higher."""
    from llmkit.model.config import ModelConfig
    from llmkit.model.transformer import Transformer

    class CharTok:
        bos_token_id = 1
        def encode(self, s, add_special_tokens=False):
            return [2 + (ord(c) % 60) for c in s]

    tok = CharTok()
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=64))
    opt = torch.optim.AdamW(m.parameters(), 1e-2)
    pairs = [("double abc", "abcabc"), ("double xyz", "xyzxyz"), ("double pqr", "pqrpqr")]
    ids = torch.tensor([[1] + tok.encode(q + ":" + a) for q, a in pairs])
    for _ in range(60):
        loss = torch.nn.functional.cross_entropy(m(ids)[:, :-1].transpose(1, 2), ids[:, 1:])
        opt.zero_grad(); loss.backward(); opt.step()
    m.eval()
    s1 = idata.ifd_score(m, tok, "double abc:", "abcabc")
    assert s1 == idata.ifd_score(m, tok, "double abc:", "abcabc")  # deterministic
    assert idata.ifd_score(m, tok, "double abc:", "cbacba") > s1


def test_sft_trains_through_the_trainer(tiny, tmp_path):
    from llmkit.train.config import TrainConfig
    from llmkit.train.trainer import Trainer

    g = torch.Generator().manual_seed(0)
    exs = []
    for _ in range(32):  # "prompt a b c SEP -> c b a": loss only on the reversed part
        x = torch.randint(10, 40, (4,), generator=g).tolist()
        ids = [2] + x + [5] + x[::-1] + [1]
        exs.append({"input_ids": ids, "labels": [IGNORE] * 6 + ids[6:]})
    loader = sft.SFTLoader(exs, batch_size=8, packed=True, seq_len=48)
    cfg = TrainConfig(max_steps=25, micro_batch_size=8, seq_len=48, lr=3e-3, warmup_steps=2, weight_decay=0.0,
                      log_every=40, progress=False, tensorboard=False, device="cpu")
    first = Trainer(tiny, cfg, iter(loader)).train_step([next(iter(loader))])[0]
    final = Trainer(tiny, cfg, loader, out_dir=tmp_path).fit()
    assert final["loss"] < 0.8 * first, (first, final["loss"])


def test_mixing_pretraining_documents_masks_and_ratio(tok):
    it = [sft.tokenize_chat(tok, CHAT[:3]) for _ in range(40)]
    docs = [tok.encode("the quick brown fox jumps over the lazy dog")]
    mixed = sft.mix_pretraining(it, docs, ratio=0.25, seed=0)
    lm = [e for e in mixed if e["labels"] == e["input_ids"]]
    assert len(mixed) == 50 and len(lm) == 10  # exact ratio
    for e in mixed:
        if e in lm:
            assert IGNORE not in e["labels"]
        else:
            assert IGNORE in e["labels"] and any(l != IGNORE for l in e["labels"])
