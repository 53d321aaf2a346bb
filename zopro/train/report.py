"""What a run tells its user: a metrics JSONL line per step, a summary table, and a reward-curve PNG."""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path


class Phases:
    """One line on stderr as each phase of a run starts and as it ends, with its time (``show`` False: silent)."""

    def __init__(self, show: bool):
        self.show = show

    @contextmanager
    def __call__(self, what: str):
        if not self.show:
            yield
            return
        from tqdm.auto import tqdm

        tqdm.write(f"{what} ...", file=sys.stderr)  # above the training's progress bar, not inside it
        start = time.perf_counter()
        yield
        tqdm.write(f"{what}: done in {time.perf_counter() - start:.0f} s", file=sys.stderr)


class MetricsLog:
    """Appends one JSON line per step to ``metrics.jsonl``; flushes and fsyncs each line (a kill loses at most one).

    ``truncate(n_bytes)`` drops lines written after the checkpoint a resumed run restarts from.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.touch()

    def size(self) -> int:
        return self.path.stat().st_size

    def truncate(self, n_bytes: int) -> None:
        with open(self.path, "r+b") as f:
            f.truncate(n_bytes)

    def write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]


def summary_table(records: list[dict], evaluation: dict) -> str:
    """A markdown table per iteration (mode, steps, mean reward, KL, loss, step time, peak memory) and the eval."""
    rows = ["| iteration | mode | steps | reward (RM score) | judge score | KL | loss | step time (s) "
            "| peak rollout / update (MiB) |", "|---|---|---|---|---|---|---|---|---|"]
    for it in sorted({r["iteration"] for r in records}):
        rs = [r for r in records if r["iteration"] == it]

        def mean(key, rs=rs):
            return sum(r[key] for r in rs) / len(rs)

        peaks = (max(r["peak_rollout"] for r in rs) / 2**20, max(r["peak_update"] for r in rs) / 2**20)
        judged = [r["judge_score"] for r in rs if r.get("judge_score") is not None]
        judge = f"{sum(judged) / len(judged):.4f}" if judged else "-"
        rows.append(f"| {it} | {rs[0]['mode']} | {len(rs)} | {mean('reward'):.4f} | {judge} | {mean('kl'):.4f} | "
                    f"{mean('loss'):.4f} | {mean('step_time'):.2f} | {peaks[0]:.0f} / {peaks[1]:.0f} |")
    lines = ["\n".join(rows)]
    if evaluation.get("before") is not None and evaluation.get("after") is not None:
        se = evaluation.get("change_se")
        spread = f" ± {se:.4f} paired standard error" if se is not None else ""
        lines.append(f"\nHeld-out judge score ({evaluation['metric']}, {evaluation['n']} prompts x "
                     f"{evaluation['samples']} samples): before {evaluation['before']:.4f} -> after "
                     f"{evaluation['after']:.4f} ({evaluation['change']:+.4f}{spread})")
    held_out = evaluation.get("held_out") or {}
    if all(f"{name}_change" in held_out for name in ("kl", "tokens", "repeat_3")):  # runs from before: no KL
        def change(name, fmt):
            se = held_out.get(f"{name}_change_se")
            return f"{held_out[name]:{fmt}} ({held_out[f'{name}_change']:+{fmt}}" + \
                (f" ± {se:{fmt}})" if se is not None else ")")

        lines.append(f"KL(policy || reference) {change('kl', '.4f')} nats per answer; answer length "
                     f"{change('tokens', '.1f')} tokens; repeated word trigrams {change('repeat_3', '.4f')}; "
                     f"distinct-2 {held_out['distinct_2_before']:.4f} -> {held_out['distinct_2']:.4f}")
    return "\n".join(lines)


def plot_rewards(records: list[dict], path: Path, title: str = "ZOPrO reward") -> None:
    """Reward-model score and KL-penalised reward per step, coloured by iteration; written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    judged = any(r.get("judge_score") is not None for r in records)
    fig, axes = plt.subplots(1, 3 if judged else 2, figsize=(15 if judged else 10, 3.6))
    for it in sorted({r["iteration"] for r in records}):
        rs = [r for r in records if r["iteration"] == it]
        x = [r["global_step"] for r in rs]
        label = f"iter {it} ({rs[0]['mode']})"
        axes[0].plot(x, [r["reward"] for r in rs], marker=".", label=label)
        axes[1].plot(x, [r["kl"] for r in rs], marker=".", label=label)
        if judged:
            axes[2].plot(x, [r.get("judge_score") for r in rs], marker=".", label=label)
    axes[0].set(xlabel="step", ylabel="reward-model score", title=title)
    axes[1].set(xlabel="step", ylabel="KL to reference (sum over tokens)", title="KL")
    if judged:
        axes[2].set(xlabel="step", ylabel="judge score of the rollout", title="judge (gold) score")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    tmp = Path(path).with_name(Path(path).stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
