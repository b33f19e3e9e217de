"""BM25 retrieval recall on a fixture corpus; prompt and citation formatting."""
from llmkit.eval.lm import LM
from llmkit.prompting import rag

CORPUS = ["Paris is the capital and largest city of France.", "The Eiffel Tower was completed in 1889 in Paris.",
          "Berlin is the capital of Germany.", "Mount Everest is Earth's highest mountain above sea level.",
          "The Nile is a major north-flowing river in northeastern Africa.", "Tokyo is the capital of Japan."]
QUERIES = ["What is the capital of France?", "When was the Eiffel Tower completed?", "highest mountain on Earth",
           "Which river flows north in Africa?", "capital of Japan"]
RELEVANT = [0, 1, 3, 4, 5]


def test_recall_at_k():
    r = rag.Retriever(CORPUS)
    assert rag.recall_at_k(r, QUERIES, RELEVANT, 1) == 1.0
    assert rag.recall_at_k(r, ["zebra stripes"], [{2}], 1) == 0.0  # no shared word: nothing relevant is found


def test_prompt_and_citations():
    p = rag.rag_prompt("Q?", ["first", "second"])
    assert p == ("Answer the question using the passages below and cite them as [n].\n\n[1] first\n[2] second\n\n"
                 "Question: Q?\nAnswer:")
    assert rag.citations("Paris [1], per [3] and [1].") == [1, 3]


class Echo(LM):
    def generate(self, prompts, **kw):
        return [" Paris [1]." for _ in prompts]


def test_answer_with_retrieval_maps_citations_to_corpus_indices():
    out = rag.answer_with_retrieval(Echo(), rag.Retriever(CORPUS), "What is the capital of France?", k=2)
    assert out["retrieved"][0] == 0 and out["cited_passages"] == [0] and out["answer"] == "Paris [1]."
