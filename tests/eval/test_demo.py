"""The demo hook runs on data-free tasks and returns one table across models."""
from llmkit.eval.demo import run


def test_demo_table_and_files(tiny, tmp_path):
    from eval_util import tiny_model

    model, tok = tiny
    models = {"tiny-a": (model, tok), "tiny-b": (tiny_model(tok.vocab_size, seed=1, d_model=64), tok)}
    text = run(models, tmp_path, symbolic_n=2, humaneval_n=1)
    for row in ("| arithmetic | exact_match |", "| coin_flip | exact_match |", "| last_letter | exact_match |",
                "| humaneval | pass@1 |"):
        assert row in text
    assert text.splitlines()[0] == "| task | metric | tiny-a | tiny-b |"
    assert (tmp_path / "tiny-a" / "results.json").exists() and (tmp_path / "scaling.png").exists()
