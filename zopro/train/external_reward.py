"""An external reward model: any one-label sequence classifier (``--reward-model``), used instead of the reward
adapter on the policy's shared base (:class:`zopro.train.models.PolicyRewardModel`)."""

from __future__ import annotations

import torch
from torch import nn


class AnyRewardModel:
    """Any ``AutoModelForSequenceClassification`` with one label, used as reward model.

    If ``tokenizer`` is None the model must share the policy's vocabulary and scores token ids directly; otherwise it
    scores ``(prompt, completion)`` texts, formatted with its own chat template when it has one.
    Its weights are not LoRA tensors of the policy's base, so targeted sampling cannot use it.
    """

    def __init__(self, model: nn.Module, tokenizer=None):
        num_labels = getattr(getattr(model, "config", None), "num_labels", None)
        if num_labels != 1:
            raise ValueError(f"reward model must be a sequence classifier with num_labels=1, got {num_labels}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        if tokenizer is not None and tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token

    @classmethod
    def from_pretrained(cls, model_id_or_path, dtype=torch.float32, device=None, own_tokenizer=True):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        model = AutoModelForSequenceClassification.from_pretrained(
            model_id_or_path, dtype=dtype, num_labels=1, device_map=None if device is None else torch.device(device)
        )
        tokenizer = AutoTokenizer.from_pretrained(model_id_or_path) if own_tokenizer else None
        if model.config.pad_token_id is None and tokenizer is not None:
            model.config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id
        return cls(model, tokenizer)

    def _format(self, prompt: str, completion: str) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        return prompt + completion

    def scores(self, input_ids, attention_mask, prompts=None, completions=None) -> torch.Tensor:
        device = next(self.model.parameters()).device
        if self.tokenizer is None:
            out = self.model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device))
            return out.logits[:, 0].float()
        if prompts is None or completions is None or len(prompts) != len(completions):
            raise ValueError(
                "prompts and completions (one per row) are required: the reward model has its own tokenizer"
            )
        texts = [self._format(p, c) for p, c in zip(prompts, completions, strict=True)]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, padding_side="right", add_special_tokens=False)
        out = self.model(input_ids=enc.input_ids.to(device), attention_mask=enc.attention_mask.to(device))
        return out.logits[:, 0].float()
