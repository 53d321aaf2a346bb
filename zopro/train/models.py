"""Models for ZOPrO: one base causal LM shared by the policy, the reference and the reward model.

The paper's pipeline keeps three models (reference policy, policy, reward model) of the same architecture. Memory is
the whole point of zeroth-order training, so here they share ONE base model held once in memory:

- ``policy``    = base + the "policy" LoRA adapter,
- ``reference`` = base with adapters disabled, or base + a frozen "reference" adapter when an SFT adapter is given,
- ``reward``    = base body + the "reward" LoRA adapter + a scalar score head on the last non-pad token
  (like ``AutoModelForSequenceClassification``).

The policy and reward adapters use the same LoRA config, so their tensors have the same names and shapes once the
adapter name is removed from the parameter name ("canonical" names). Targeted sampling maps the reward model's update
onto the policy's tensor of the same canonical name.

The bases themselves are loaded (or, for tests and the smoke preset, built) by :mod:`zopro.train.loading`; an external
reward model (``--reward-model``) is :class:`zopro.train.external_reward.AnyRewardModel`.

Library code never touches torch's global generator: adapter initialisation and sampling run inside
``torch.random.fork_rng`` seeded from explicit arguments, so the caller's RNG state is the same before and after.
"""

from __future__ import annotations

import contextlib
import copy
import pathlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from zopro.train import quiet
from zopro.train.external_reward import AnyRewardModel
from zopro.train.token_batch import (
    Generation,
    check_token_batch,
    grad_context,
    last_true_index,
    position_ids,
    rng_devices,
)

POLICY, REWARD, REFERENCE = "policy", "reward", "reference"
VALUE = "value"  # optional critic adapter for first-order PPO baselines (see add_value_adapter)
# Targets of "all-linear" for Llama-style models; used when a peft version rejects "all-linear".
LLAMA_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# --------------------------------------------------------------------------------------------------------------------
# The bundle
# --------------------------------------------------------------------------------------------------------------------


class PolicyRewardModel:
    """One base causal LM, held once, with "policy" and "reward" LoRA adapters and a reward score head.

    Args:
        base: a causal LM (``LlamaForCausalLM`` or any model peft can wrap). It is modified in place (LoRA layers are
            injected) and frozen.
        lora_r, lora_alpha, lora_dropout, target_modules: LoRA config shared by both adapters.
        trainable_dtype: dtype of the LoRA weights and the score head. fp32 by default even for a bf16 base: a ZO
            perturbation eps=1e-5 of bf16 weights of magnitude ~0.02 rounds away for most elements.
        sft_adapter: path of a saved peft LoRA adapter (the SFT policy). When given, it is loaded twice: as the frozen
            "reference" adapter and as the initial "policy"; the reward adapter copies its LoRA config.
        reward_model: an :class:`AnyRewardModel` to use instead of the shared reward adapter
            (then ``shares_parameter_space`` is False and there is no "reward" adapter).
        eos_token_id, pad_token_id: override the ids read from ``base.generation_config`` / ``base.config``.
        seed: initialisation seed of the adapters and the score head (the global RNG is not touched).
    """

    def __init__(
        self,
        base: nn.Module,
        *,
        lora_r: int = 8,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.0,
        target_modules: str | Sequence[str] = "all-linear",
        trainable_dtype: torch.dtype = torch.float32,
        sft_adapter: str | pathlib.Path | None = None,
        reward_model: AnyRewardModel | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        seed: int = 0,
    ):
        from peft import LoraConfig

        if not isinstance(lora_r, int) or lora_r < 1:
            raise ValueError(f"lora_r must be a positive int, got {lora_r!r}")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")
        if not isinstance(trainable_dtype, torch.dtype) or not trainable_dtype.is_floating_point:
            raise TypeError(f"trainable_dtype must be a floating torch.dtype, got {trainable_dtype!r}")
        if reward_model is not None and not isinstance(reward_model, AnyRewardModel):
            raise TypeError(f"reward_model must be an AnyRewardModel, got {type(reward_model).__name__}")
        self.trainable_dtype = trainable_dtype
        self.external_reward = reward_model
        # token positions passed forward through the base so far, padding included (the frontier's compute axis)
        self.token_passes = 0
        self.eos_token_ids, self.pad_token_id = self._special_ids(base, eos_token_id, pad_token_id)
        config = LoraConfig(
            r=lora_r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            target_modules=list(target_modules) if not isinstance(target_modules, str) else target_modules,
            bias="none",
            task_type="CAUSAL_LM",
        )
        for p in base.parameters():
            p.requires_grad_(False)
        with torch.random.fork_rng(devices=rng_devices(base)):
            torch.manual_seed(seed)
            self.model = self._wrap(base, config, sft_adapter)
            hidden = base.config.get_text_config().hidden_size
            self.score_head = None
            if reward_model is None:
                self.score_head = nn.Linear(hidden, 1, bias=False)  # bias-free like HF *ForSequenceClassification
                nn.init.normal_(self.score_head.weight, std=getattr(base.config, "initializer_range", 0.02))
        if self.score_head is not None:
            self.score_head.to(device=next(base.parameters()).device, dtype=trainable_dtype)
        self._params = {name: self._collect(name) for name in self.adapter_names}
        for name, params in self._params.items():
            for p in params.values():
                p.data = p.data.to(trainable_dtype)
                p.requires_grad_(name != REFERENCE)
        self._active = POLICY
        self._activate(POLICY)
        self.model.eval()

    # -- construction helpers ----------------------------------------------------------------------------------------

    @staticmethod
    def _special_ids(base, eos_token_id, pad_token_id) -> tuple[list[int], int]:
        gen = getattr(base, "generation_config", None)
        eos = eos_token_id
        for source in (gen, base.config):
            if eos is None and source is not None:
                eos = getattr(source, "eos_token_id", None)
        if eos is None:
            raise ValueError("eos_token_id is required: the base model's config does not define one")
        eos = [eos] if isinstance(eos, int) else list(eos)
        pad = pad_token_id
        for source in (gen, base.config):
            if pad is None and source is not None:
                pad = getattr(source, "pad_token_id", None)
        return eos, eos[0] if pad is None else pad

    def _wrap(self, base, config, sft_adapter):
        from peft import PeftModel, get_peft_model

        if sft_adapter is None:
            with quiet.peft_wrapping():
                model = self._get_peft_model(get_peft_model, base, config)
        else:
            with quiet.peft_wrapping():
                model = PeftModel.from_pretrained(base, str(sft_adapter), adapter_name=REFERENCE, is_trainable=False)
            model.load_adapter(str(sft_adapter), adapter_name=POLICY, is_trainable=True)
            config = copy.deepcopy(model.peft_config[REFERENCE])
            config.inference_mode = False
        if self.external_reward is None:
            model.add_adapter(REWARD, copy.deepcopy(config))
        return model

    @staticmethod
    def _get_peft_model(get_peft_model, base, config):
        try:
            return get_peft_model(base, config, adapter_name=POLICY)
        except ValueError:
            if config.target_modules != "all-linear":  # fallback only for old peft without "all-linear"
                raise
            config.target_modules = list(LLAMA_LINEAR)
            return get_peft_model(base, config, adapter_name=POLICY)

    def _collect(self, adapter: str) -> dict[str, nn.Parameter]:
        tag = f".{adapter}."
        return {n.replace(tag, "."): p for n, p in self.model.named_parameters() if tag in n and "lora_" in n}

    # -- adapters --------------------------------------------------------------------------------------------------

    @property
    def adapter_names(self) -> list[str]:
        return [n for n in (POLICY, REWARD, REFERENCE, VALUE) if n in self.model.peft_config]

    @property
    def shares_parameter_space(self) -> bool:
        """True when the reward model is the shared-base "reward" adapter (targeted sampling is possible)."""
        return self.external_reward is None

    @property
    def base(self) -> nn.Module:
        """The underlying causal LM (with LoRA layers injected)."""
        return self.model.get_base_model()

    @property
    def device(self) -> torch.device:
        return next(self.base.parameters()).device

    def _require_shared_reward(self) -> None:
        if self.external_reward is not None:
            raise RuntimeError("the reward model is external (shares_parameter_space=False): it has no reward adapter")

    def _activate(self, adapter: str) -> None:
        self.model.set_adapter(adapter)
        # peft's set_adapter flips requires_grad (active adapter on, others off); we keep our own rule instead:
        # policy and reward are trainable, the reference never is, whichever adapter is active.
        for name, params in self._params.items():
            for p in params.values():
                p.requires_grad_(name != REFERENCE)
        self._active = adapter

    @contextlib.contextmanager
    def _using(self, adapter: str | None) -> Iterator[None]:
        """Run with ``adapter`` active (None: adapters disabled), then restore the previously active one."""
        previous = self._active
        if adapter is None:
            with self.model.disable_adapter():
                yield
            return
        try:
            self._activate(adapter)
            yield
        finally:
            self._activate(previous)

    def use_policy(self) -> None:
        """Make the policy adapter active (for direct calls of ``self.model``)."""
        self._activate(POLICY)

    def use_reward(self) -> None:
        """Make the reward adapter active (for direct calls of ``self.model``)."""
        self._require_shared_reward()
        self._activate(REWARD)

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """Context in which ``self.model`` is the reference policy (adapters disabled, or the SFT adapter)."""
        with self._using(REFERENCE if REFERENCE in self.model.peft_config else None):
            yield

    # -- parameters ------------------------------------------------------------------------------------------------

    def policy_parameters(self) -> dict[str, nn.Parameter]:
        """Policy LoRA tensors by canonical name (adapter name removed), e.g.
        ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``."""
        return dict(self._params[POLICY])

    def reward_parameters(self) -> dict[str, nn.Parameter]:
        """Reward LoRA tensors by canonical name (same keys and shapes as :meth:`policy_parameters`); no score head."""
        self._require_shared_reward()
        return dict(self._params[REWARD])

    def score_head_parameters(self) -> dict[str, nn.Parameter]:
        self._require_shared_reward()
        return {f"score.{n}": p for n, p in self.score_head.named_parameters()}

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Copies of all trainable tensors, keys prefixed ``policy.``, ``reward.`` and ``score.`` (for checkpoints
        and reward-model merging)."""
        state = {f"policy.{n}": p.detach().clone() for n, p in self._params[POLICY].items()}
        if self.shares_parameter_space:
            state |= {f"reward.{n}": p.detach().clone() for n, p in self._params[REWARD].items()}
            state |= {n: p.detach().clone() for n, p in self.score_head_parameters().items()}
        return state

    def load_trainable_state_(self, state: dict[str, torch.Tensor]) -> None:
        """Copy ``state`` (as from :meth:`trainable_state`) into the parameters in place; keys must match exactly."""
        own = {f"policy.{n}": p for n, p in self._params[POLICY].items()}
        if self.shares_parameter_space:
            own |= {f"reward.{n}": p for n, p in self._params[REWARD].items()} | self.score_head_parameters()
        if set(state) != set(own):
            missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
            raise ValueError(f"state keys do not match: missing {missing[:3]}, unexpected {extra[:3]}")
        for n, p in own.items():
            if state[n].shape != p.shape:
                raise ValueError(f"state[{n!r}] has shape {tuple(state[n].shape)}, expected {tuple(p.shape)}")
        with torch.no_grad():
            for n, p in own.items():
                p.copy_(state[n])

    # -- standard formats ------------------------------------------------------------------------------------------

    # -- forward passes --------------------------------------------------------------------------------------------

    def _hidden(self, input_ids, attention_mask) -> torch.Tensor:
        lm = self.base
        body = getattr(lm, lm.base_model_prefix)  # the decoder without lm_head: no [B, T, V] logits are built
        self.token_passes += input_ids.numel()
        out = body(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            position_ids=position_ids(attention_mask).to(self.device),
            use_cache=False,
        )
        return out.last_hidden_state

    def _token_logprobs(self, input_ids, attention_mask, response_mask, temperature):
        hidden = self._hidden(input_ids, attention_mask)
        target = response_mask[:, 1:].to(self.device).bool()  # token t is predicted from position t-1
        logits = self.base.get_output_embeddings()(hidden[:, :-1][target]).float()  # [N, V], N response tokens
        if temperature != 1.0:
            logits = logits / temperature
        ids = input_ids[:, 1:].to(self.device)[target]
        # gather - logsumexp instead of log_softmax: one [N, V] buffer fewer (0.9 GB for 32x53 tokens at V=128k).
        logp = logits.gather(-1, ids.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
        token_logps = torch.zeros(target.shape, dtype=logp.dtype, device=logp.device).masked_scatter(target, logp)
        token_logps = torch.nn.functional.pad(token_logps, (1, 0))  # [B, T], aligned with input_ids
        return token_logps.sum(-1), token_logps

    def policy_logprobs(self, input_ids, attention_mask, response_mask, *, grad=False, temperature=1.0):
        """Log-probs of the response tokens under the policy: ``(sums [B], token_logps [B, T])``, fp32.

        ``token_logps[b, t] = log p(input_ids[b, t] | input_ids[b, :t])`` where ``response_mask[b, t] == 1``, else 0.
        ``temperature`` divides the logits (1.0: the model's own distribution). Runs under ``torch.inference_mode``
        unless ``grad=True``.
        """
        check_token_batch(input_ids, attention_mask, response_mask)
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        with grad_context(grad), self._using(POLICY):
            return self._token_logprobs(input_ids, attention_mask, response_mask, temperature)

    def reference_logprobs(self, input_ids, attention_mask, response_mask, *, grad=False, temperature=1.0):
        """As :meth:`policy_logprobs`, under the reference policy."""
        check_token_batch(input_ids, attention_mask, response_mask)
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        with grad_context(grad), self.reference():
            return self._token_logprobs(input_ids, attention_mask, response_mask, temperature)

    def reward_scores(self, input_ids, attention_mask, *, grad=False, prompts=None, completions=None) -> torch.Tensor:
        """Scalar reward per row [B] (fp32): score head on the hidden state of the last non-pad token.

        With an external reward model that has its own tokenizer, ``prompts`` and ``completions`` (texts, one per
        row) are scored instead of the ids.
        """
        check_token_batch(input_ids, attention_mask)
        with grad_context(grad):
            if self.external_reward is not None:
                return self.external_reward.scores(input_ids, attention_mask, prompts, completions)
            with self._using(REWARD):
                hidden = self._hidden(input_ids, attention_mask)
            last = last_true_index(attention_mask).to(hidden.device)
            h = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
            return self.score_head(h.to(self.trainable_dtype)).squeeze(-1).float()

    # -- optional value adapter (PPO baselines) ---------------------------------------------------------------------

    def add_value_adapter(self, seed: int = 0) -> dict[str, nn.Parameter]:
        """Add a trainable "value" LoRA adapter on the shared base, with the policy adapter's LoRA config, and return
        its tensors by canonical name (see :meth:`value_parameters`).

        For a PPO critic that does not share LoRA weights with the policy while the base is still held once. The
        value head lives with the caller (``zopro.train.ppo.ValueModel``). Nothing else changes: checkpoints
        (:meth:`trainable_state`) still hold policy, reward and score head only. ``seed`` seeds the LoRA
        initialisation (the global RNG is not touched). Raises ``ValueError`` if the adapter exists already.
        """
        if VALUE in self.model.peft_config:
            raise ValueError(f"the bundle already has a {VALUE!r} adapter")
        config = copy.deepcopy(self.model.peft_config[POLICY])
        config.inference_mode = False
        with torch.random.fork_rng(devices=rng_devices(self.base)):
            torch.manual_seed(seed)
            self.model.add_adapter(VALUE, config)
        self._params[VALUE] = self._collect(VALUE)
        for p in self._params[VALUE].values():
            p.data = p.data.to(self.trainable_dtype)
        self._activate(self._active)  # peft's add_adapter may flip requires_grad; restore our rule
        self.model.eval()
        return self.value_parameters()

    def value_parameters(self) -> dict[str, nn.Parameter]:
        """Value LoRA tensors by canonical name (same keys and shapes as :meth:`policy_parameters`)."""
        if VALUE not in self._params:
            raise RuntimeError("the bundle has no value adapter: call add_value_adapter() first")
        return dict(self._params[VALUE])

    def value_hidden_states(self, input_ids, attention_mask, *, grad=False) -> torch.Tensor:
        """Last hidden states ``[B, T, H]`` of the base under the value adapter (positions as in generate)."""
        check_token_batch(input_ids, attention_mask)
        self.value_parameters()  # raises if there is no value adapter
        with grad_context(grad), self._using(VALUE):
            return self._hidden(input_ids, attention_mask)

    # -- sampling --------------------------------------------------------------------------------------------------

    def generate(self, prompt_input_ids, prompt_attention_mask, k, max_new_tokens, temperature, generator_seed):
        """Sample ``k`` completions per (left-padded) prompt from the policy: pure sampling (top_k=0, top_p=1),
        stopping at EOS; ``temperature`` 0: greedy decoding (``k`` must be 1). Returns a :class:`Generation`; rows
        ``i*k .. i*k+k-1`` belong to prompt ``i``.

        transformers samples from torch's global generator, so sampling runs inside ``torch.random.fork_rng`` seeded
        with ``generator_seed``: the same seed gives the same samples and the caller's RNG state is left unchanged.
        """
        from transformers import GenerationConfig

        check_token_batch(prompt_input_ids, prompt_attention_mask)
        for name, value in (("k", k), ("max_new_tokens", max_new_tokens)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature!r}")
        if temperature == 0 and k != 1:
            raise ValueError(f"greedy decoding (temperature 0) gives one answer per prompt: k must be 1, got {k}")
        # A bare config, swapped in for the call: the model's own generation_config could otherwise fill in
        # repetition_penalty, top_p, ... and we would not sample from the policy we compute log-probs of.
        sampling = dict(do_sample=True, top_k=0, top_p=1.0, temperature=float(temperature)) if temperature > 0 else \
            dict(do_sample=False)
        config = GenerationConfig(
            **sampling,
            max_new_tokens=max_new_tokens,
            num_return_sequences=k,
            eos_token_id=self.eos_token_ids,
            pad_token_id=self.pad_token_id,
            bos_token_id=getattr(self.base.generation_config, "bos_token_id", None),
        )
        ids = prompt_input_ids.to(self.device)
        mask = prompt_attention_mask.to(self.device)
        lm = self.base
        saved = lm.generation_config
        try:
            lm.generation_config = config
            with torch.inference_mode(), self._using(POLICY), torch.random.fork_rng(devices=rng_devices(lm)):
                torch.manual_seed(generator_seed)
                sequences = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        finally:
            lm.generation_config = saved
        self.token_passes += sequences.numel()  # with the KV cache, each position passes the model once
        return self._generation(sequences, mask.repeat_interleave(k, dim=0))

    def _generation(self, sequences, prompt_mask) -> Generation:
        prompt_length = prompt_mask.shape[1]
        new = sequences[:, prompt_length:]
        is_eos = torch.isin(new, torch.tensor(self.eos_token_ids, device=new.device)).long()
        after_eos = (is_eos.cumsum(-1) - is_eos) > 0  # strictly after the first EOS
        response = (~after_eos).long()
        response_mask = torch.cat([torch.zeros_like(prompt_mask), response], dim=1)
        attention_mask = torch.cat([prompt_mask.long(), response], dim=1)
        return Generation(sequences, attention_mask, response_mask, prompt_length)
