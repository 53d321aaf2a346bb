"""ZO iterations that move: log-prob temperature, steps in guide units, guides, epochs per rollout, lr decay."""

from __future__ import annotations

import dataclasses
import json
import math
import statistics

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from zopro import Core, Targeted, ZOOptimizer
from zopro.seeds import derive_seed
from zopro.train import run
from zopro.train.checkpoint import load as load_checkpoint
from zopro.train.config import preset, validate
from zopro.train.distributed import SOLO
from zopro.train.evaluate import main as evaluate_main
from zopro.train.losses import reduce_ppo_terms
from zopro.train.members import member_losses
from zopro.train.models import PolicyRewardModel
from zopro.train.next_guide import adam_direction, next_guide
from zopro.train.rollout import collect_rollout, sample_completions, tokenize_prompts
from zopro.train.updaters import GenerationFitness, core_bases, logprob_temperature, surrogate, surrogate_terms

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/zopro/conftest.py

PROMPTS = ["hello", "tell me about the blue sea", "why is the sky blue ?"]


@pytest.fixture
def bundle(tiny_llama_config, make_tiny_model):
    bundle = PolicyRewardModel(make_tiny_model(LlamaForCausalLM, tiny_llama_config, seed=0), lora_r=4, seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a policy that differs from the reference (the base with adapters off)
        for name, p in bundle.policy_parameters().items():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return bundle


def test_greedy_decoding_takes_the_argmax_token_at_every_position(bundle, tiny_tokenizer):
    ids, mask = tokenize_prompts(tiny_tokenizer, PROMPTS, 16, bundle.pad_token_id)
    gen = bundle.generate(ids, mask, 1, 5, 0.0, 0)
    assert torch.equal(gen.sequences, bundle.generate(ids, mask, 1, 5, 0.0, 123).sequences)  # no seed is read
    bundle.use_policy()
    with torch.no_grad():
        logits = bundle.model(input_ids=gen.sequences, attention_mask=gen.attention_mask).logits
    new = gen.response_mask[:, 1:].bool()  # each generated token is the argmax after its prefix
    assert torch.equal(logits[:, :-1].argmax(-1)[new], gen.sequences[:, 1:][new])
    with pytest.raises(ValueError, match="greedy decoding .* k must be 1"):
        bundle.generate(ids, mask, 2, 5, 0.0, 0)


def test_generation_fitness_is_minus_the_mean_reward_of_the_greedy_answers(bundle, tiny_tokenizer):
    def length(prompts, completions):  # a reward the answers differ in
        return torch.tensor([float(len(c)) for c in completions])

    fitness = GenerationFitness(tiny_tokenizer, length, max_new_tokens=6, max_prompt_len=16)
    closure = fitness.closure(bundle, PROMPTS, SOLO)
    _, texts = sample_completions(bundle, tiny_tokenizer, PROMPTS, 1, 6, 0.0, 0, 16)
    assert float(closure()) == pytest.approx(-sum(len(t) for t in texts) / len(PROMPTS), rel=1e-7)  # float32 mean
    assert float(closure()) == float(closure())  # every member is scored on the same greedy answers' prompts


@pytest.mark.parametrize("loss", ["sequence", "token"])
def test_members_scored_in_one_forward_match_perturbing_the_weights(bundle, tiny_tokenizer, loss):
    ro = collect_rollout(bundle, tiny_tokenizer, PROMPTS, k=4, max_new_tokens=6, temperature=0.7, kl_coef=0.05,
                         seed=5, max_prompt_len=16, logprob_temperature=0.7)
    opt = ZOOptimizer(bundle.policy_parameters(), lr=0.0, eps=1.0, sampler=Core(core_bases(bundle)), q=3, seed=1)
    seeds = [derive_seed(1, 0, j) for j in range(3)]
    for seed in seeds:
        opt.sampler.prepare(seed)
    rows = torch.arange(len(ro.sequences))
    batched = member_losses(bundle, opt, [ro], SOLO, seeds, 2.0, rows_of=lambda r: rows, loss=loss, clip=0.2,
                            per_forward=4)  # 6 members: a forward of 4 and one of 2
    probed = []
    for seed in seeds:
        for sign in (1.0, -1.0):
            opt._pass([(seed, sign * 2.0)])
            probed.append(float(reduce_ppo_terms(surrogate_terms(bundle, ro, rows, loss=loss, clip=0.2))))
            opt._pass([(seed, -sign * 2.0)])
    assert batched == pytest.approx(probed, rel=1e-4, abs=1e-6)
    assert len(set(probed)) == 6  # the members differ, so the comparison can fail


def test_logprobs_default_to_the_sampling_temperature():
    cfg = preset("smoke")
    assert cfg.logprob_temperature == 0 and logprob_temperature(cfg) == cfg.temperature == 0.7
    assert logprob_temperature(dataclasses.replace(cfg, logprob_temperature=1.0)) == 1.0


def test_ratio_is_exactly_one_at_the_sampling_weights(bundle, tiny_tokenizer):
    ro = collect_rollout(bundle, tiny_tokenizer, PROMPTS, k=4, max_new_tokens=6, temperature=0.7, kl_coef=0.05,
                         seed=5, max_prompt_len=16, logprob_temperature=0.7)
    rows = torch.arange(len(ro.sequences))
    # ratio exp(new - old) == 1 at the weights that sampled: the surrogate is -mean(A) to the last bit
    assert surrogate(bundle, ro, rows, loss="sequence", clip=0.2).item() == \
        (-ro.advantages).mean().item()


@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_kl_estimate_is_a_kl_of_the_sampling_distribution(bundle, tiny_tokenizer, temperature):
    """One new token, every token of the vocabulary: at the sampling temperature the log-probs are those of the
    distribution sampled from (they sum to 1), so the rollout's KL estimate has expectation KL(pi_T || ref_T) >= 0."""
    ids, mask = tokenize_prompts(tiny_tokenizer, PROMPTS[1:2], 16, bundle.pad_token_id)
    vocab = len(tiny_tokenizer)
    seq = torch.cat([ids.repeat(vocab, 1), torch.arange(vocab)[:, None]], 1)
    att = torch.cat([mask.repeat(vocab, 1), torch.ones(vocab, 1, dtype=torch.long)], 1)
    resp = torch.zeros_like(seq)
    resp[:, -1] = 1
    policy = bundle.policy_logprobs(seq, att, resp, temperature=temperature)[0].double()
    ref = bundle.reference_logprobs(seq, att, resp, temperature=temperature)[0].double()
    p = policy.exp()
    assert p.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert (p * (policy - ref)).sum().item() > 0  # the policy differs from the reference


def _policy(path):
    return {n: t for n, t in load_file(str(path)).items()}


def test_smoke_zo_iteration_moves_the_weights_with_decaying_lr(tmp_path):
    cfg = dataclasses.replace(preset("smoke"), output_dir=str(tmp_path / "run"), threads=1)
    with pytest.raises(KeyboardInterrupt):  # stop at the start of iteration 1: the policy after iteration 0
        run(cfg, progress=False, stop_after_steps=cfg.steps_per_iteration)
    meta, tensors, _ = load_checkpoint(tmp_path / "run")
    assert (meta["iteration"], meta["step"]) == (1, 0)
    after_fo = {n[len("policy."):]: t for n, t in tensors["iter_start"].items() if n.startswith("policy.")}
    run(dataclasses.replace(cfg), resume=True, progress=False)
    final = _policy(tmp_path / "run" / "policy_adapter.safetensors")
    moved = math.sqrt(sum(float((final[n] - after_fo[n]).double().pow(2).sum()) for n in after_fo))
    zo = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    zo = [r for r in zo if r["mode"] == "zo-targeted"]
    assert len(zo) == cfg.steps_per_iteration and all(r["grad"] != 0 for r in zo)
    assert [r["lr"] for r in zo] == [cfg.zo_lr * (1 - t / len(zo)) for t in range(len(zo))]  # linear decay to 0
    # unit-norm directions: a step moves lr * |g| (|z| = 1 up to the noise's cross term), so the whole iteration
    # moves the policy by more than 0 and at most about the sum of the steps
    steps = [abs(r["lr"] * r["grad"]) for r in zo]
    assert 0 < moved < 1.5 * sum(steps)


def test_unit_scale_directions_have_norm_one():
    gen = torch.Generator().manual_seed(0)
    prev = {"a": torch.randn(40, 30, generator=gen) * 3.0, "b": torch.randn(50, generator=gen) * 0.01}
    total = math.sqrt(sum(float(t.pow(2).sum()) for t in prev.values()))

    def direction(d0, seed):
        params = {n: torch.zeros_like(t) for n, t in prev.items()}
        sampler = Targeted(prev, None, d0=d0, schedule="constant", scale="unit", impl="torch")
        opt = ZOOptimizer(params, lr=0.0, eps=1.0, sampler=sampler, seed=seed)
        sampler.prepare(seed)
        opt._pass([(seed, 1.0)])
        return params

    z = direction(1.0, 3)  # d = 1: exactly the unit guide
    for n in prev:
        torch.testing.assert_close(z[n], prev[n] / total, rtol=1e-6, atol=1e-7)
    # d = 0.6: guide part of norm 0.6 plus noise of norm 0.8 per tensor share; |z|^2 = 1 up to the cross term
    norms = [math.sqrt(sum(float(t.pow(2).sum()) for t in direction(0.6, s).values())) for s in range(20)]
    assert statistics.fmean(norms) == pytest.approx(1.0, abs=0.05)


def test_adam_guide_is_the_direction_adam_steps_in():
    gen = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.randn(6, 5, generator=gen))
    start = w.detach().clone()
    opt = torch.optim.AdamW([w], lr=0.01, weight_decay=0.0)
    (w * torch.randn(6, 5, generator=gen)).sum().backward()
    opt.step()
    # after one step m_hat = g, v_hat = g^2: the step is -lr * g / (|g| + eps), the guide its direction
    guide = adam_direction(opt, {"w": w})["w"]
    torch.testing.assert_close(guide * 0.01, w.detach() - start, rtol=1e-5, atol=1e-9)


def test_guides_carry_information_through_zo_iterations():
    gen = torch.Generator().manual_seed(0)
    moved = {"a": torch.randn(8, 4, generator=gen), "b": torch.randn(4, generator=gen) * 1e-3}
    earlier = {n: torch.randn(t.shape, generator=gen) for n, t in moved.items()}

    def guide(kind, previous=None, fo_opt=None, seed=0):
        return next_guide(kind, moved, previous, fo_opt, {}, seed)

    assert guide("prev", earlier) is moved
    cumulative = guide("cumulative", earlier)
    for n in moved:
        assert torch.equal(cumulative[n], earlier[n] + moved[n])
    assert guide("adam", earlier) is earlier  # a ZO iteration keeps the first-order direction it was given
    placebo, again, other = guide("placebo", seed=1), guide("placebo", seed=1), guide("placebo", seed=2)
    for n in moved:
        assert torch.equal(placebo[n], again[n]) and not torch.equal(placebo[n], other[n])
        assert placebo[n].norm().item() == pytest.approx(moved[n].norm().item(), rel=1e-6)
        cos = torch.nn.functional.cosine_similarity(placebo[n].flatten(), moved[n].flatten(), dim=0)
        assert abs(cos.item()) < 0.8


def test_zo_epochs_take_several_steps_per_rollout(tmp_path):
    cfg = dataclasses.replace(preset("smoke"), output_dir=str(tmp_path / "run"), threads=1, zo_epochs=3,
                              n_eval_prompts=1, eval_samples=1)
    run(cfg, progress=False)
    log = torch.load(tmp_path / "run" / "zo_log_iter1.pt", weights_only=True)
    assert log["step_count"] == 3 * cfg.steps_per_iteration
    assert log["sampler"]["t"] == 3 * cfg.steps_per_iteration


def test_a_population_with_shaped_fitness_reaches_the_programs_optimiser(tmp_path):
    cfg = dataclasses.replace(preset("smoke"), output_dir=str(tmp_path / "run"), threads=1, zo_population=3,
                              zo_fitness="ranks", n_eval_prompts=1, eval_samples=1)
    run(cfg, progress=False)
    log = torch.load(tmp_path / "run" / "zo_log_iter1.pt", weights_only=True)
    assert (log["q"], log["fitness"]) == (3, "ranks")
    assert len(log["log"]["losses"]) == 2 * 3 * cfg.steps_per_iteration  # 2N losses a step, nothing else
    with pytest.raises(ValueError, match="zo.fitness"):
        validate(dataclasses.replace(cfg, zo_fitness="softmax"))


def test_probe_guide_scores_the_policy_moved_along_the_runs_guide(tmp_path, capsys):
    cfg = dataclasses.replace(preset("smoke"), output_dir=str(tmp_path / "run"), threads=1, iterations=1)
    run(cfg, progress=False)
    guide = load_checkpoint(tmp_path / "run")[1]["guides_prev"]
    norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in guide.values()))
    rows = evaluate_main([str(tmp_path / "run"), "--eval-samples", "2", "--probe-guide", "0", "30"])
    assert [r["distance"] for r in rows] == [0.0, 30.0]
    assert rows[0]["change"] == 0.0 and rows[0]["change_se"] == 0.0  # same weights, same sampling seeds
    assert all(r["guide_norm"] == pytest.approx(norm, rel=1e-9) for r in rows)
    assert f"| run | {norm:.4f} | 30 |" in capsys.readouterr().out


BLOCK_NAMES = ["model.layers.0.q.lora_A", "model.layers.0.q.lora_B", "model.layers.1.q.lora_A", "score.bias"]


def _block_prev():
    gen = torch.Generator().manual_seed(4)
    return {n: torch.randn(6, 3, generator=gen) for n in BLOCK_NAMES}


@pytest.mark.parametrize("blocks, expected", [("whole", [0, 0, 0, 0]), ("layer", [0, 0, 1, 2]),
                                               ("tensor", [0, 1, 2, 3])])
def test_guide_blocks_weigh_each_blocks_part_of_the_guide(blocks, expected):
    # d = 1 and --zo-scale paper: z = sum_b s_b prev_b exactly, so one step on a linear loss c . w from w = 0 moves
    # every tensor by -lr (c . z) s_b prev_b: its ratio to prev is the block's weight times one shared factor
    prev = _block_prev()
    gen = torch.Generator().manual_seed(5)
    c = {n: torch.randn(6, 3, generator=gen) for n in BLOCK_NAMES}
    w = {n: torch.zeros(6, 3) for n in BLOCK_NAMES}
    sampler = Targeted(prev, None, d0=1.0, scale="paper", blocks=blocks, impl="torch")
    opt = ZOOptimizer(w, lr=0.1, eps=1e-3, sampler=sampler, seed=7)
    opt.step(lambda: sum((c[n].double() * w[n].double()).sum() for n in BLOCK_NAMES))
    assert sampler.block_index.tolist() == expected
    ratios = torch.tensor([float((w[n].double() * prev[n].double()).sum() / prev[n].double().pow(2).sum())
                           for n in BLOCK_NAMES])
    for n in BLOCK_NAMES:  # each tensor moved along its own guide: the step stays in the blocks' subspace
        torch.testing.assert_close(w[n].double(), ratios[BLOCK_NAMES.index(n)] * prev[n].double(), rtol=1e-4,
                                   atol=1e-7)
    weights = [ratios[i] / ratios[0] for i in range(len(BLOCK_NAMES))]
    if blocks == "whole":  # the guide's line: every tensor moved by the same multiple of its guide
        assert weights == pytest.approx([1.0] * 4, rel=1e-4)
        return
    drawn = sampler.block_weights(_direction_seed(opt))
    assert weights == pytest.approx([float(drawn[i] / drawn[0]) for i in expected], rel=1e-3)
    assert len({round(float(x), 6) for x in weights}) == max(expected) + 1  # the blocks really differ


def _direction_seed(opt) -> int:
    """The seed of the (single) direction of ``opt``'s first step."""
    from zopro.seeds import derive_seed
    return derive_seed(opt.seed, 0, 0)


def test_block_weights_are_standard_normal_and_independent():
    # E[s_b] = 0, E[s_b^2] = 1 (the direction's expected length is that of the whole guide's), no correlation
    # between blocks; bounds of 5 standard errors over 4000 directions x 3 blocks
    sampler = Targeted(_block_prev(), None, blocks="layer")
    sampler.bind(BLOCK_NAMES, [torch.zeros(6, 3) for _ in BLOCK_NAMES])
    s = torch.stack([sampler.block_weights(seed) for seed in range(4000)])
    n = s.numel()
    assert abs(float(s.mean())) < 5 / math.sqrt(n)
    assert abs(float(s.pow(2).mean()) - 1) < 5 * math.sqrt(2 / n)
    assert abs(float((s[:, 0] * s[:, 1]).mean())) < 5 / math.sqrt(4000)
    assert torch.equal(sampler.block_weights(11), sampler.block_weights(11))


def test_guide_blocks_reach_the_programs_sampler_and_need_a_guided_sampler():
    from zopro.seeds import RunSeeds
    from zopro.train.config import from_args, zo_config
    from zopro.train.state import Guides
    from zopro.train.updaters import make_zo_optimizer

    cfg, _ = from_args(["--preset", "smoke", "--guide-blocks", "layer", "--output-dir", "unused"])
    params = {"model.layers.0.a": torch.nn.Parameter(torch.zeros(3)),
              "model.layers.1.a": torch.nn.Parameter(torch.zeros(3))}

    class Bundle:
        def policy_parameters(self):
            return params

    guides = Guides(prev={n: torch.ones(3) for n in params}, delta={})
    opt = make_zo_optimizer(Bundle(), zo_config(cfg), 1, guides, RunSeeds(0))
    assert opt.sampler.blocks == "layer" and opt.sampler.n_blocks == 2
    with pytest.raises(ValueError, match="--guide-blocks: .*isotropic"):
        from_args(["--preset", "smoke", "--guide-blocks", "tensor", "--sampler", "isotropic", "--output-dir", "x"])


def test_layer_blocks_follow_each_stack_and_need_a_layer_index():
    names = ["encoder.layers.3.q", "encoder.layers.3.k", "decoder.layers.3.q", "bert.encoder.layer.0.q", "head"]
    sampler = Targeted({n: torch.ones(2) for n in names}, None, blocks="layer")
    sampler.bind(names, [torch.zeros(2) for _ in names])
    assert sampler.block_index.tolist() == [0, 0, 1, 2, 3]
    with pytest.raises(ValueError, match="no tensor name has a layer index"):
        Targeted({"a": torch.ones(2)}, None, blocks="layer").bind(["a", "b"], [torch.zeros(2), torch.zeros(2)])


def test_a_sampler_state_of_other_blocks_or_scale_is_refused():
    prev = _block_prev()
    w = {n: torch.zeros(6, 3) for n in BLOCK_NAMES}
    saved = ZOOptimizer(w, lr=0.1, eps=1e-3, sampler=Targeted(prev, None, blocks="layer"), seed=1).state_dict()
    for other in (dict(blocks="whole"), dict(blocks="layer", scale="paper")):
        opt = ZOOptimizer(w, lr=0.1, eps=1e-3, sampler=Targeted(prev, None, **other), seed=1)
        with pytest.raises(ValueError, match="of another sampler"):
            opt.load_state_dict(saved)
    ZOOptimizer(w, lr=0.1, eps=1e-3, sampler=Targeted(prev, None, blocks="layer"), seed=1).load_state_dict(saved)
