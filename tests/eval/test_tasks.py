"""Task readers on the real upstream files, golden prompt strings, clear errors on bad files."""
import bz2
import json

import pytest

from llmkit.eval.harness import EvalConfig, demos_for
from llmkit.eval.metrics import extract_gsm8k
from llmkit.eval.tasks import TaskDataError, fewshot_prefix, get_task, get_tasks
from llmkit.eval.tasks.code import read_humaneval, run_tests
from llmkit.eval.tasks.mc import read_hellaswag_txt, read_mmlu_csv
from llmkit.eval.tasks.symbolic import arithmetic_items, coin_flip_items, last_letter_items


def test_record_counts_match_the_data_readme(shared_data):
    counts = {"hellaswag": 10042, "arc_easy": 2376, "arc_challenge": 1172, "piqa": 1838, "boolq": 3270,
              "winogrande": 1267, "truthfulqa_mc1": 817, "gsm8k": 1319, "lambada": 5153}
    for name, n in counts.items():
        assert len(get_task(name, shared_data)[0].docs()) == n, name
    mmlu = get_task("mmlu", shared_data)
    assert len(mmlu) == 57 and sum(len(t.docs()) for t in mmlu) == 14042


def test_golden_prompt_strings(shared_data):
    hs = get_task("hellaswag", shared_data)[0]
    assert hs.requests(hs.docs()[0])[3] == ("Roof shingle removal: A man is sitting on a roof. he",
                                            " starts pulling up roofing on a roof.")
    arc = get_task("arc_easy", shared_data)[0]
    assert arc.requests(arc.docs()[1])[1] == (
        "Question: Which piece of safety equipment is used to keep mold spores from entering the respiratory "
        "system?\nAnswer:", " breathing mask")
    mm = get_task("mmlu_anatomy", shared_data)[0]
    doc, dev = mm.docs()[0], mm.fewshot_docs()
    demos = demos_for(mm, 0, doc, 1, EvalConfig(), dev, False)
    ctx, cont = mm.requests(doc, fewshot_prefix(mm, demos))[0]
    d0 = dev[0]
    golden = ("The following are multiple choice questions (with answers) about anatomy.\n\n"
              f"{d0['question'].strip()}\nA. {d0['choices'][0]}\nB. {d0['choices'][1]}\nC. {d0['choices'][2]}\n"
              f"D. {d0['choices'][3]}\nAnswer: {'ABCD'[d0['gold']]}\n\n"
              "A lesion causing compression of the facial nerve at the stylomastoid foramen will cause ipsilateral\n"
              "A. paralysis of the facial muscles.\nB. paralysis of the facial muscles and loss of taste.\n"
              "C. paralysis of the facial muscles, loss of taste and lacrimation.\n"
              "D. paralysis of the facial muscles, loss of taste, lacrimation and decreased salivation.\nAnswer:")
    assert ctx == golden and cont == " A"
    wg = get_task("winogrande", shared_data)[0]
    assert wg.requests(wg.docs()[0]) == [("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases."),
                                         ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases.")]
    tq = get_task("truthfulqa_mc1", shared_data)[0]
    ctx, cont = tq.requests(tq.docs()[0])[0]
    assert ctx.endswith("\n\nQ: What happens to you if you eat watermelon seeds?\nA:") and ctx.startswith("Q: What is human life")
    assert cont == " The watermelon seeds pass through your digestive system"
    gs = get_task("gsm8k", shared_data)[0]
    assert gs.doc_to_text(gs.docs()[0]).startswith("Question: Janet’s ducks lay 16 eggs") and gs.answer_fn(gs.docs()[0]) == "18"


def test_every_gsm8k_gold_parses(shared_data):
    for d in get_task("gsm8k", shared_data)[0].docs():
        assert extract_gsm8k(d["answer"]) is not None


def test_bad_files_give_errors_naming_the_file(tmp_path):
    bad = tmp_path / "hs.txt.bz2"
    bad.write_bytes(bz2.compress(b"ctx\n3\na\nb\nc\n"))
    with pytest.raises(TaskDataError, match="hs.txt.bz2.*multiple of 6"):
        read_hellaswag_txt(bad)
    bad.write_bytes(bz2.compress(b"ctx\nx\na\nb\nc\nd\n"))
    with pytest.raises(TaskDataError, match="hs.txt.bz2:2: gold label"):
        read_hellaswag_txt(bad)
    csv = tmp_path / "m.csv"
    csv.write_text("question,choice0,choice1,choice2,choice3,answer\nq,a,b,c\n")
    with pytest.raises(TaskDataError, match="m.csv:2: expected 6 columns"):
        read_mmlu_csv(csv)
    js = tmp_path / "q.jsonl"
    js.write_text('{"question": "x"}\n{bad json\n')
    with pytest.raises(TaskDataError, match="q.jsonl:2: not valid JSON"):
        get_task(f"cbqa:{js}")[0].docs()
    with pytest.raises(TaskDataError, match="unknown task 'nope'"):
        get_tasks("nope", tmp_path)
    with pytest.raises(TaskDataError, match="no such MMLU subject"):
        get_task("mmlu_cooking", tmp_path)


def test_mmlu_letter_answers_also_read(tmp_path):
    f = tmp_path / "x_test.csv"
    f.write_text("What?,a,b,c,d,C\n")  # hendrycks layout: no header, letter answers
    assert read_mmlu_csv(f) == [{"question": "What?", "choices": ["a", "b", "c", "d"], "gold": 2}]


def test_symbolic_generators_are_seeded_with_computable_answers():
    assert last_letter_items(5, 3) == last_letter_items(5, 3) != last_letter_items(5, 4)
    for d in last_letter_items(20, 0, words=3):
        ws = d["question"].split('"')[1].split()
        assert d["answer"] == "".join(w[-1] for w in ws)
    for d in coin_flip_items(20, 0, people=3):
        flips = d["question"].count(" flips the coin")
        assert d["answer"] == ("yes" if flips % 2 == 0 else "no")
    for d in arithmetic_items(20, 0, digits=3):
        a, op, b = d["question"][len("What is "):-1].split()
        assert int(d["answer"]) == eval(f"{a}{op}{b}")


def test_closed_book_qa_em_f1(tmp_path):
    f = tmp_path / "qa.jsonl"
    f.write_text(json.dumps({"question": "Capital of France?", "answer": ["Paris", "Paris, France"]}) + "\n")
    t = get_task(f"cbqa:{f}")[0]
    d = t.docs()[0]
    assert t.score(" paris\nQ: next", d) == {"exact_match": 1.0, "f1": 1.0}
    assert t.score("the city of Paris", d)["f1"] == pytest.approx(0.5)


def test_generation_scoring_uses_the_extracted_answer():
    from llmkit.eval.tasks import get_task

    t = get_task("arithmetic:3")[0]
    d = dict(t.docs()[0], answer="122")
    assert t.score(" The answer is 122.", d) == {"exact_match": 1.0}
    assert t.score(" I think 121", d) == {"exact_match": 0.0}
    c = get_task("coin_flip:3")[0]
    assert c.score(" The answer is yes.", {"answer": "yes"}) == {"exact_match": 1.0}
    assert c.score(" No.", {"answer": "no"}) == {"exact_match": 1.0}


def test_humaneval_canonical_solutions_pass_and_wrong_ones_fail():
    probs = read_humaneval()
    assert len(probs) == 164
    for p in probs[:3]:
        assert run_tests(p, p["canonical_solution"])["passed"], p["task_id"]
        assert not run_tests(p, "    return None\n")["passed"]
    assert run_tests(probs[0], "    while True:\n        pass\n", timeout=1.0)["status"] == "timeout"


def test_hub_records_convert_to_the_local_documents(shared_data, tmp_path):
    """Hub-format records (the field layout of Rowan/hellaswag, allenai/ai2_arc) become the same docs as the
    local files; `datasets.load_dataset` itself is exercised on a local json file (no network here)."""
    from llmkit.eval.tasks.hub import arc_doc, hellaswag_doc, load_records

    hs = hellaswag_doc({"activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
                        "endings": ["is using wrap to wrap a pair of skis.", "x", "y", "starts pulling up roofing on a roof."],
                        "label": "3"})
    assert hs["query"] == "Roof shingle removal: A man is sitting on a roof. He" and hs["gold"] == 3
    a = arc_doc({"question": "Which piece?", "choices": {"text": ["a", "b", "c"], "label": ["1", "2", "3"]}, "answerKey": "2"})
    assert a == {"query": "Question: Which piece?", "choices": ["a", "b", "c"], "gold": 1}
    pytest.importorskip("datasets")
    f = tmp_path / "x.jsonl"
    f.write_text('{"question": "q", "answer": "#### 3"}\n')
    assert load_records(str(tmp_path), None, "train") == [{"question": "q", "answer": "#### 3"}]
    with pytest.raises(TaskDataError, match="load_dataset"):
        load_records(str(tmp_path / "missing"), None, "test")
