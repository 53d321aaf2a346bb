"""``python -m zopro.train.export RUN_DIR --merged OUT``: a finished run's policy merged into its base, for
transformers.

Reads the run's standard PEFT folder ``RUN_DIR/policy`` (written when the run finished), loads the base the way the
run did (the smoke preset's tiny base from ``RUN_DIR/base``; a GGUF base dequantised to the run's ``--dtype``),
merges the LoRA weights into it (``merge_and_unload``) and writes ``OUT`` in ``save_pretrained`` format
(``config.json``, ``model.safetensors``, ``generation_config.json``; zopro's ``manifest.json`` of their SHA-256
sums) with the run's tokenizer, so that
``AutoModelForCausalLM.from_pretrained(OUT)`` and ``AutoTokenizer.from_pretrained(OUT)`` load it without zopro or peft.

Every check runs before anything is written: one line on stderr and exit status 2 when a file it loads is refused
(a pickle ``weights_only`` rejects), when ``RUN_DIR`` is not a finished
run, lacks its ``policy`` folder, its ``policy`` or ``base`` folder fails its manifest's checksums, was trained on a
bitsandbytes-quantised base, or ``OUT`` exists and is not an empty directory; exit status 3 for a full disk or a
read-only mount. ``OUT`` is written whole under a temporary name beside it and renamed into place.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

from zopro.train import checkpoint, files, quiet
from zopro.train.config import TrainConfig
from zopro.train.loading import find_smollm2_gguf, load_base


def _finished_config(run_dir: Path) -> TrainConfig:
    """The typed config of the finished run in ``run_dir`` whose policy folder is written; ValueError otherwise."""
    cfg, _ = checkpoint.load_finished(run_dir)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not (run_dir / "policy" / name).is_file():
            raise ValueError(f"{run_dir / 'policy' / name}: missing (a run finished by an older zopro: "
                             f"`python -m zopro.train --resume --output-dir {run_dir}` writes it)")
    if cfg.quantize != "none":
        raise ValueError(f"{run_dir}: trained on a bitsandbytes-quantised base (--quantize {cfg.quantize}); merging "
                         "into quantised weights would change the model, so --merged is for unquantised runs only")
    if cfg.model == "tiny" and not (run_dir / "base" / "config.json").is_file():
        raise ValueError(f"{run_dir / 'base'}: missing (the smoke preset's base is saved there when the run finishes)")
    # the folders are read only as their manifests vouch for them (unchecked for a run made before they had one)
    legacy = checkpoint.made_before_output_checksums(run_dir)
    for folder in ("policy", "base") if cfg.model == "tiny" else ("policy",):
        files.verify_folder(run_dir / folder, unchecked_legacy=legacy)
    return cfg


def _check_out(out: Path) -> None:
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise ValueError(f"--merged {out}: exists and is not an empty directory")
    if not out.parent.is_dir():
        raise ValueError(f"--merged {out}: its parent directory does not exist")


def _base(cfg: TrainConfig, run_dir: Path):
    """``(causal LM, tokenizer)``: the run's base, unquantised, on the CPU."""
    dtype = getattr(torch, cfg.dtype)
    if cfg.model == "tiny":
        return load_base(str(run_dir / "base"), dtype=dtype)
    if cfg.model == "smollm2":
        gguf = find_smollm2_gguf()
        return load_base(str(gguf.parent), gguf_file=gguf.name, dtype=dtype)
    return load_base(cfg.model, gguf_file=cfg.gguf_file or None, dtype=dtype)


@contextlib.contextmanager
def _refusals(source):
    """A load from ``source`` that fails (a pickle ``weights_only`` refuses, a damaged file) as one ValueError line
    naming it; file-system errors pass on as they are."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 (transformers, peft, torch and safetensors raise their own types)
        if isinstance(err, OSError) and files.disk_error(err, source) is not None:
            raise
        raise ValueError(f"{source}: refused to load ({files.first_line(err)})") from None


def export_merged(run_dir: Path, out: Path) -> Path:
    """Write the merged policy of the finished run in ``run_dir`` to ``out`` (see the module docstring)."""
    from peft import PeftModel

    run_dir, out = Path(run_dir), Path(out)
    try:
        lock = checkpoint.lock(run_dir) if run_dir.is_dir() else None
    except ValueError:
        raise ValueError(f"{run_dir}: a run is using it (it holds the directory's lock); export when it ends") from None
    try:
        cfg = _finished_config(run_dir)
        _check_out(out)
        with _refusals(run_dir / "base" if cfg.model == "tiny" else cfg.model):
            base, tokenizer = _base(cfg, run_dir)
        with _refusals(run_dir / "policy"), quiet.peft_wrapping():
            merged = PeftModel.from_pretrained(base, str(run_dir / "policy")).merge_and_unload()
        with files.scratch_folder(out.with_name(f".{out.name}.tmp")) as tmp:  # removed if a write fails
            merged.save_pretrained(tmp)  # safetensors
            tokenizer.save_pretrained(tmp)
            files.atomic_publish_dir(tmp, out)
        return out
    finally:
        if lock is not None:
            lock.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zopro.train.export", allow_abbrev=False,
                                     description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path, help="the directory of a finished run")
    parser.add_argument("--merged", type=Path, required=True, metavar="OUT",
                        help="write the policy merged into its base here (a new or empty directory)")
    args = parser.parse_args(argv)
    try:
        out = export_merged(args.run_dir, args.merged)
    except ValueError as err:  # what the user passed is wrong: one line, nothing written
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a full disk or a read-only mount: one line (OUT is published whole or not at all)
        line = files.disk_error(err, args.merged)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        return 3
    print(f"merged model: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
