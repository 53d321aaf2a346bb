"""TRL's ``RLOOTrainer`` as an external peer: the step the embedded default job takes, run by TRL instead of zopro.

``python -m benchmarks.trl_peer [--steps 4] [--threads 2]`` trains SmolLM2-135M-Instruct (the offline GGUF of the
default job) with TRL's RLOOTrainer on the shipped prompts, in one fresh process: LoRA r 8 / alpha 16 on every linear
layer, 4 prompts x k = 4 completions a step, 32 new tokens at temperature 0.7, KL coefficient 0.05, AdamW lr 1e-3,
the heuristic judge's score as the reward function (TRL needs no reward model for it, so this peer does less work
than our job, which also scores with a reward adapter and computes reference log-probs the same way TRL does).
It prints one JSON line: TRL's version, the median seconds per training step (generation, reward, and update: the
same span as a step of ``python -m zopro.train``, whose ``step_time`` is logged per step) after the first, and the
peak resident memory from the loaded model on (VmHWM, reset after loading). Needs ``pip install trl``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.trl_peer")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)

    import torch
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import RLOOConfig, RLOOTrainer

    from zopro.train import memory
    from zopro.train.data import load_default_prompts
    from zopro.train.judges import HeuristicJudge
    from zopro.train.loading import find_smollm2_gguf, load_base

    if args.threads:
        torch.set_num_threads(args.threads)
    gguf = find_smollm2_gguf()
    base, tokenizer = load_base(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
                                device=torch.device("cpu"))
    # The GGUF weights are dequantised to fp32 on load, but transformers still marks the model as GGUF-quantised,
    # and its Trainer refuses to train such a model: clear the mark (the weights are plain fp32 tensors).
    base.is_quantized, base.hf_quantizer = False, None
    judge = HeuristicJudge()

    def text(x) -> str:  # conversational datasets hand TRL's reward functions lists of messages
        return x[-1]["content"] if isinstance(x, list) else x

    def reward(prompts, completions, **_):
        return judge.score([text(p) for p in prompts], [text(c) for c in completions]).tolist()

    prompts = [r.prompt for r in load_default_prompts()]
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in prompts]})
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.t0 = time.perf_counter()

        def on_step_end(self, *_, **__):
            times.append(time.perf_counter() - self.t0)

    with tempfile.TemporaryDirectory() as out:
        config = RLOOConfig(output_dir=out, use_cpu=True, bf16=False, per_device_train_batch_size=16,
                            num_generations=4, max_completion_length=32, temperature=0.7, beta=0.05,
                            learning_rate=1e-3, max_steps=args.steps, logging_steps=1, report_to=[],
                            save_strategy="no", seed=0)
        trainer = RLOOTrainer(model=base, reward_funcs=reward, args=config, train_dataset=dataset,
                              processing_class=tokenizer, callbacks=[Timer()],
                              peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                     task_type="CAUSAL_LM"))
        memory.reset_peak(torch.device("cpu"))
        trainer.train()
        peak = memory.peak_bytes(torch.device("cpu"))
    result = {"peer": "trl.RLOOTrainer", "trl": trl.__version__, "steps": len(times),
              "median_step_s": statistics.median(times[1:] or times), "first_step_s": times[0],
              "peak_mib": peak / 2**20, "threads": torch.get_num_threads()}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
