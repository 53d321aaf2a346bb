"""A bundle's adapters as standard PEFT folders, which PEFT and transformers load without zopro
(:func:`save`; ``docs/run-directory.md``, "Using a run outside zopro").
"""

from __future__ import annotations

import copy
import pathlib

from zopro.train.models import POLICY, REWARD


def save(bundle, directory, base_model_name_or_path: str | None = None) -> list[str]:
    """Write ``bundle``'s adapters as standard PEFT adapter folders in ``directory``; returns the folders' names.

    - ``policy``: PEFT's own ``PeftModel.save_pretrained`` of the policy adapter (task ``CAUSAL_LM``); loads with
      ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder)``.
    - ``reward`` (shared reward model only): the reward adapter as a ``SEQ_CLS`` LoRA adapter, the score head its
      saved module ``score``: PEFT's own config writer and key names, as PEFT saves a LoRA-tuned
      ``AutoModelForSequenceClassification``; loads with ``PeftModel.from_pretrained(
      AutoModelForSequenceClassification.from_pretrained(base, num_labels=1), folder)``. That class pools the
      last token that is not ``pad_token_id`` at positions ``0..T-1``: the bundle's ``reward_scores`` for unpadded
      or right-padded rows.

    ``base_model_name_or_path`` (default: the one peft reads off the base) goes into both ``adapter_config.json``.
    Not atomic: the caller publishes the folders (``files.atomic_publish_dir``)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    directory = pathlib.Path(directory)
    policy_config = bundle.model.peft_config[POLICY]
    kept = policy_config.base_model_name_or_path, policy_config.target_modules
    try:
        if base_model_name_or_path is not None:
            policy_config.base_model_name_or_path = base_model_name_or_path
        # peft keeps "all-linear" resolved as a set, written in hash order: sorted, a rewrite is byte-identical
        policy_config.target_modules = sorted_targets(policy_config.target_modules)
        # non-default adapter names go to a subfolder of that name: directory / "policy". The base's embeddings
        # are never saved: zopro neither resizes the vocabulary nor changes them (peft's "auto" probes the base's
        # config.json for a resize, and warns when the base is a folder without one: a GGUF's, SmolLM2's)
        bundle.model.save_pretrained(str(directory), selected_adapters=[POLICY], save_embedding_layers=False)
        base_name = policy_config.base_model_name_or_path  # peft fills it in when it was None
    finally:
        policy_config.base_model_name_or_path, policy_config.target_modules = kept
    if bundle.external_reward is not None:
        return [POLICY]
    config = copy.deepcopy(bundle.model.peft_config[REWARD])
    config.task_type, config.modules_to_save, config.inference_mode = "SEQ_CLS", ["score"], True
    config.base_model_name_or_path = base_name
    config.target_modules = sorted_targets(config.target_modules)
    tensors = get_peft_model_state_dict(bundle.model, adapter_name=REWARD, save_embedding_layers=False)
    tensors["base_model.model.score.weight"] = bundle.score_head.weight  # the key PEFT writes for a saved module
    folder = directory / REWARD
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(folder))
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
              str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return [POLICY, REWARD]


def sorted_targets(targets):
    return sorted(targets) if isinstance(targets, (set, frozenset)) else targets
