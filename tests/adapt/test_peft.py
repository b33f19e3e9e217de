"""LoRA: init = base, merged = unmerged, parameter count, parity with `peft`, PEFT-format save/load both ways."""
import copy

import pytest
import torch

from llmkit.adapt import peft as lk

from adapt_ref import hf_llama, llmkit_from_hf

IDS = torch.tensor([[5, 9, 17, 33, 2, 70, 11, 4], [8, 8, 40, 41, 42, 3, 90, 1]])


def _randomise_lora(model):
    for m in lk.lora_modules(model).values():
        torch.nn.init.normal_(m.lora_B.weight, std=0.1)


def test_init_equals_base_and_param_count(tiny):
    base = tiny(IDS)
    names = lk.apply_lora(tiny, r=4, alpha=8, targets=("q", "v", "down"))
    assert torch.equal(tiny(IDS), base)
    mods = lk.lora_modules(tiny)
    trainable, _ = lk.trainable_parameters(tiny)
    assert trainable == sum(4 * (m.in_features + m.out_features) for m in mods.values())
    assert len(names) == 3 * tiny.cfg.n_layers


def test_merged_equals_unmerged_and_only_lora_gets_grads(tiny):
    lk.apply_lora(tiny, r=4, alpha=8, targets="all")
    _randomise_lora(tiny)
    out = tiny(IDS)
    out.sum().backward()
    for n, p in tiny.named_parameters():
        assert (p.grad is not None) == ("lora_" in n), n
    lk.set_merged(tiny, True)
    torch.testing.assert_close(tiny(IDS), out, atol=1e-5, rtol=1e-5)
    lk.set_merged(tiny, False)
    torch.testing.assert_close(tiny(IDS), out, atol=1e-5, rtol=1e-5)
    merged = lk.merge_lora(copy.deepcopy(tiny))
    assert not lk.lora_modules(merged)
    torch.testing.assert_close(merged(IDS), out, atol=1e-5, rtol=1e-5)
    with lk.lora_disabled(tiny):
        assert not torch.allclose(tiny(IDS), out)


def _peft_model(hf, targets, r=4, alpha=8, rslora=False):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, use_rslora=rslora)
    pm = get_peft_model(hf, cfg)
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    return pm.eval()


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_matches_peft_and_adapter_roundtrip(tmp_path, rslora):
    from peft import PeftModel

    hf = hf_llama()
    ours = llmkit_from_hf(hf)
    pm = _peft_model(copy.deepcopy(hf), ["q_proj", "v_proj", "up_proj", "o_proj"], rslora=rslora)
    # peft -> disk -> llmkit
    pm.save_pretrained(tmp_path / "from_peft")
    lk.load_adapter(ours, tmp_path / "from_peft")
    with torch.no_grad():
        ref = pm(IDS).logits
        torch.testing.assert_close(ours(IDS), ref, atol=1e-5, rtol=1e-4)
    # llmkit -> disk -> peft
    _randomise_lora(ours)
    lk.save_adapter(ours, tmp_path / "ours", base_model="tiny-llama")
    assert (tmp_path / "ours" / "adapter_config.json").exists()
    loaded = PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, ours(IDS), atol=1e-5, rtol=1e-4)


def test_load_adapter_errors(tmp_path, tiny):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        lk.load_adapter(tiny, tmp_path)
    with pytest.raises(ValueError, match="no Linear layer"):
        lk.apply_lora(tiny, targets=("nope",))
