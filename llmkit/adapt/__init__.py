"""llmkit.adapt: adaptation of pre-trained LLMs (survey §5).

- `sft`       instruction-tuning data: templates, chat formatting with role masks, packing, mixing, Self-Instruct (§5.1)
- `reward`    reward model (scalar head) with pairwise / K-wise ranking losses (§5.2.3 step 2)
- `dpo`       DPO, IPO and KTO objectives with a frozen reference (§5.2.4)
- `ppo`       RLHF with PPO: KL-penalised rewards, GAE, clipped policy and value losses, rollouts (§5.2.3 step 3)
- `grpo`      GRPO: group-normalised advantages over verifiable rewards
- `rewards`   verifiable rewards (exact numeric answers) and the arithmetic task generator
- `rollout`   cached sampling, best-of-n and rejection sampling (§5.2.3 practical strategies)
- `peft`      LoRA / QLoRA, bottleneck adapters, prefix and prompt tuning; PEFT-format adapters (§5.3)
- `quantize`  RTN, GPTQ, SmoothQuant, LLM.int8() decomposition, NF4, fake-quant QAT (§5.4 / §9.5)
Every method is a loss function `loss_fn(model, batch) -> (loss, metrics)` plus a data source for the one
trainer in `llmkit.train.trainer`; none of them owns a training loop.
"""
