"""One optimisation step of a preference-tuning algorithm, timed and memory-profiled in a process of its own.

``python -m benchmarks.algo_step --algo ALGO --size SIZE --batch B --seq T`` builds a randomly initialised model of
SIZE (random weights are fine for speed and memory) with LoRA policy and reward adapters on one base, a synthetic
rollout of B sequences of T tokens (the second half is the response), runs one warm-up step and ``--steps`` timed
steps, and prints one JSON line: median seconds per step, and the peak memory of the process from the loaded model
on (CPU: the resident-set high-water mark, VmHWM, reset after loading; CUDA: ``torch.cuda.max_memory_allocated``).

Algorithms share the model, the rollout and the surrogate (``zopro.train.updaters.surrogate``): only the
optimisation differs.

* ``forward2``: two inference forwards of the policy, the floor of any two-point ZO step;
* ``zopro-isotropic`` / ``zopro-targeted`` / ``zopro-rank_guided``: ``ZOOptimizer.step`` (guides: random tensors of
  the policy's shapes standing in for the previous updates);
* ``mezo``: MeZO's step, per-tensor torch noise, four passes (``benchmarks.baselines.mezo_perturb_``);
* ``rloo``: first-order RLOO with backprop through the policy adapter and AdamW (``zopro.train.ppo.rloo_step``);
  ``rloo-mb2``: the same with the gradient accumulated over chunks of 2 rows (``--fo-microbatch 2``);
* ``ppo``: first-order PPO with a value adapter and head, GAE, 4 epochs (``zopro.train.ppo.ppo_step``, TRL defaults).

``--quantize nf4|int8`` puts the frozen base in bitsandbytes storage; ``rloo`` on an NF4 base is QLoRA (AdamW on
the adapters, backprop through the 4-bit base).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

SIZES = {
    # name: (vocab, hidden, intermediate, layers, heads, kv heads, LoRA r)
    "tiny": (512, 64, 192, 2, 4, 2, 4),  # bitsandbytes CPU kernels need out_features % 32 == 0
    "smollm2-135m": (49152, 576, 1536, 30, 9, 3, 8),
    "llama-1b": (128256, 2048, 8192, 16, 32, 8, 64),
}
ALGOS = ("forward2", "zopro-isotropic", "zopro-targeted", "zopro-rank_guided", "mezo", "rloo", "rloo-mb2", "ppo")


def build(size: str, device: torch.device, dtype: torch.dtype, seed: int = 0, quantize: str = "none"):
    """The bundle on a random base; ``quantize`` loads that base through bitsandbytes (NF4 with double
    quantisation computing in ``dtype``, or int8), as ``python -m zopro.train --quantize`` does."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from zopro.train.models import PolicyRewardModel

    vocab, hidden, inter, layers, heads, kv, r = SIZES[size]
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device(device if quantize == "none" else "cpu"):
            base = LlamaForCausalLM(config).to(dtype)
    if quantize != "none":
        import tempfile

        from zopro.train.loading import keep_bnb_layout, quantization_config

        quant = quantization_config(quantize, dtype)
        with tempfile.TemporaryDirectory() as tmp:
            base.save_pretrained(tmp)
            del base
            base = LlamaForCausalLM.from_pretrained(tmp, quantization_config=quant, device_map={"": device},
                                                    dtype=dtype)
        keep_bnb_layout(base)  # as the program: QLoRA's backward through the NF4 matmuls (zopro.train.loading)
    return PolicyRewardModel(base, lora_r=r, lora_alpha=2.0 * r, seed=seed), vocab


def synthetic_rollout(bundle, vocab: int, batch: int, seq: int, k: int = 2):
    from zopro.train.losses import rloo_advantages
    from zopro.train.rollout import Rollout

    g = torch.Generator().manual_seed(1)
    device = bundle.device
    sequences = torch.randint(3, vocab, (batch, seq), generator=g).to(device)
    attention = torch.ones_like(sequences)
    response = torch.zeros_like(sequences)
    response[:, seq // 2:] = 1
    with torch.inference_mode():
        logps, logps_tok = bundle.policy_logprobs(sequences, attention, response)
        ref, ref_tok = bundle.reference_logprobs(sequences, attention, response)
    scores = torch.randn(batch, generator=g).to(device)
    advantages = rloo_advantages(scores.view(-1, k)).reshape(-1)
    return Rollout(prompts=[""] * (batch // k), completions=[""] * batch,
                   prompt_index=torch.arange(batch // k, device=device).repeat_interleave(k),
                   sequences=sequences, attention_mask=attention, response_mask=response, prompt_length=seq // 2,
                   policy_logps=logps.clone(), ref_logps=ref.clone(), policy_token_logps=logps_tok.clone(),
                   ref_token_logps=ref_tok.clone(), logprob_temperature=1.0, scores=scores, kl=(logps - ref).clone(),
                   rewards=scores, advantages=advantages, k=k)


def make_step(algo: str, bundle, rollout):
    from benchmarks.baselines import mezo_perturb_
    from zopro import Isotropic, RankGuided, Targeted, ZOOptimizer
    from zopro.train.updaters import surrogate

    rows = torch.arange(len(rollout.sequences), device=rollout.sequences.device)

    def loss():
        return surrogate(bundle, rollout, rows, loss="sequence", clip=0.2)

    params = bundle.policy_parameters()
    if algo == "forward2":
        def step():
            with torch.inference_mode():
                loss(), loss()
        return step
    if algo.startswith("zopro"):
        kind = algo.split("-")[1]
        if kind == "isotropic":
            sampler = Isotropic()
        else:
            g = torch.Generator(device=bundle.device).manual_seed(2)
            guides = [{n: torch.randn(p.shape, generator=g, device=p.device) * 1e-3 for n, p in params.items()}
                      for _ in range(2)]
            sampler = (Targeted(*guides, schedule="constant") if kind == "targeted"
                       else RankGuided(*guides, rank=8, schedule="constant"))
        opt = ZOOptimizer(params, lr=1e-4, eps=1e-3, sampler=sampler, seed=3)
        return lambda: opt.step(loss)
    if algo == "mezo":
        tensors = list(params.values())
        counter = iter(range(10**9))

        def mezo_step():
            seed = next(counter)
            with torch.inference_mode():
                mezo_perturb_(tensors, seed, 1e-3)
                plus = float(loss())
                mezo_perturb_(tensors, seed, -2e-3)
                minus = float(loss())
                mezo_perturb_(tensors, seed, 1e-3)
                mezo_perturb_(tensors, seed, -1e-4 * (plus - minus) / 2e-3)
        return mezo_step
    if algo in ("rloo", "rloo-mb2"):
        from zopro.train.ppo import rloo_step

        opt = torch.optim.AdamW(list(params.values()), lr=1e-5)
        microbatch = 2 if algo == "rloo-mb2" else 0
        return lambda: rloo_step(bundle, rollout, opt, microbatch=microbatch)
    if algo == "ppo":
        from zopro.train.ppo import PPOConfig, make_ppo, ppo_step

        cfg = PPOConfig()
        value, opt = make_ppo(bundle, cfg)
        return lambda: ppo_step(bundle, value, rollout, opt, cfg)
    raise ValueError(f"unknown algo {algo!r}; choose one of {ALGOS}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--algo", choices=ALGOS, required=True)
    parser.add_argument("--size", choices=tuple(SIZES), required=True)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--quantize", choices=("none", "nf4", "int8"), default="none")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    bundle, vocab = build(args.size, device, dtype, quantize=args.quantize)
    from zopro.train.memory import peak_bytes, reset_peak

    # Count from the loaded model on: a quantised base is built in fp32 first, which is set-up, not training.
    reset_peak(device)
    rollout = synthetic_rollout(bundle, vocab, args.batch, args.seq)
    step = make_step(args.algo, bundle, rollout)
    step()  # warm-up: kernels compile, optimiser state is allocated
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    print(json.dumps({"algo": args.algo, "size": args.size, "quantize": args.quantize, "batch": args.batch,
                      "seq": args.seq,
                      "device": device.type, "dtype": str(dtype).removeprefix("torch."),
                      "seconds": statistics.median(times), "min_seconds": min(times),
                      "peak_bytes": peak_bytes(device), "steps": args.steps}))


if __name__ == "__main__":
    main()
