"""Print README benchmark-table cells from result files, so that no figure is typed by hand.

    python bench/readme_rows.py worker      # the result cell of the bench/worker.py row
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def _load(name: str) -> dict[str, Any]:
    return dict(json.loads((RESULTS / f"{name}.json").read_text()))


def _history(name: str) -> dict[str, Any]:
    """A training run's committed history (bench/results/training/NAME.json); a missing run fails."""
    return _load(f"training/{name}")


def _best_val(epochs: list[dict[str, Any]]) -> dict[str, Any]:
    """The validation scores of a run's best epoch by CIDEr (the one its best/ checkpoint holds)."""
    return dict(max(epochs, key=lambda e: e["val"]["CIDEr"])["val"])


def _val_by_epoch(epochs: list[dict[str, Any]], metric: str) -> str:
    return " / ".join(f"{e['val'][metric]:.3f}" for e in epochs)


def worker() -> str:
    d = _load("worker")
    parts = [f"one at a time {d['baseline']['photos_per_second']:.2f} photos/s"]
    for level in d["levels"]:
        parts.append(f"{level['callers']} callers: {level['photos_per_second']:.1f} photos/s "
                     f"({level['ratio_vs_one_at_a_time']:.2f}x), p50/p95 {level['latency_p50_ms'] / 1000:.2f}/"
                     f"{level['latency_p95_ms'] / 1000:.2f} s, {level['busy_answers']} busy")
    best = max(level["ratio_vs_one_at_a_time"] for level in d["levels"])
    single = d["single_request"]
    sweep: dict[int, list[str]] = {}
    for row in d.get("batch_size_sweep", {}).get("rows", []):
        sweep.setdefault(row["max_batch_size"], []).append(f"{row['photos_per_second']:.1f}")
    mismatches = d.get("caption_mismatches", 0)
    total = sum(level["requests"] for level in d["levels"])
    load = d["context"].get("load_average_before")
    text = "; ".join(parts) + f"; best **{best:.2f}x** one at a time; {total - mismatches}/{total} captions identical"
    text += (f"; single request {single['worker_ms']:.0f} ms through the worker vs {single['in_process_ms']:.0f} ms "
             f"in-process ({single['ratio']:.2f}x)")
    if sweep:
        text += "; photos/s by batch size at 64 callers, both passes: " + ", ".join(
            f"{size}: {' / '.join(values)}" for size, values in sweep.items())
    text += f"; freezing alone {d['freezing_at_batch_1']['ratio_frozen_over_eager']:.2f}x at batch 1"
    text += f"; worker peak RSS {d['worker_peak_rss_mb']:,.0f} MB"
    if load:
        text += f" (load average {load[0]:.1f} at the start)"
    return text


def train_cache() -> str:
    d = _load("train_cache")
    e = d["epoch_seconds"]
    text = (f"epoch from the cache {e['cache']:.1f} s (the faster of {len(e['cache_all_epochs'])}) vs {e['raw']:.1f} s "
            f"from raw images: {d['ratio_raw_over_cache']:.1f}x (the bench's target: {d['target_ratio']:.0f}x); "
            f"feature access alone {d['feature_ratio_raw_over_cache']:.1f}x")
    tuned = d.get("fine_tuning")
    if tuned:
        t = tuned["epoch_seconds"]
        text += (f"; fine-tuning the top {tuned['blocks']} encoder blocks: {t['cache']:.1f} s an epoch from the cached "
                 f"maps of the frozen part (filled once in {tuned['cache_fill_seconds']:.1f} s) vs {t['raw']:.1f} s "
                 f"from raw images, {tuned['ratio_raw_over_cache']:.1f}x")
    load = d["context"].get("load_average_before")
    if load:
        text += f" (load average {load[0]:.2f} at the start)"
    return text


def scale() -> str:
    d = _load("scale")
    runs = d["runs"]
    best = max(runs["embedded_1_thread"]["photos_per_second"], runs["embedded_2_threads"]["photos_per_second"])
    rate = {name: run["photos_per_second"] for name, run in runs.items()}
    text = (f"embedded {rate['embedded_1_thread']:.2f} photos/s (1 thread; {rate['embedded_2_threads']:.2f} with 2); "
            f"Ray 1 replica {rate['ray_1_replica']:.2f}, 2 replicas {rate['ray_2_replicas']:.2f} "
            f"(**{rate['ray_2_replicas'] / best:.2f}x** the best embedded, target 0.9x), two nodes "
            f"{rate['two_nodes']:.2f} ({rate['two_nodes'] / best:.2f}x, replicas on "
            f"{runs['two_nodes']['replica_nodes']} nodes)")
    identical = all(run["identical_captions"] for run in runs.values())
    load = d["context"].get("load_average_before")
    return text + f"; identical captions: {identical}" + (f" (load average {load[0]:.1f} at the start)" if load else "")


def bot_burst() -> str:
    d = _load("bot_burst")
    first = d["first_reply_ms"]
    kinds = ", ".join(f"{count} {kind}" for kind, count in d["first_reply_kinds"].items())
    load = d["context"].get("load_average_before")
    return (f"{d['photos']} photos from {d['people']} people: first reply p50 {first['p50_ms'] / 1000:.1f} s, p95 "
            f"{first['p95_ms'] / 1000:.1f} s, max {first['max_ms'] / 1000:.1f} s; first replies: {kinds}; every photo "
            f"had its reply after {d['seconds_until_every_photo_had_a_reply']:.1f} s"
            + (f" (load average {load[0]:.1f} at the start)" if load else ""))


def encoders() -> str:
    """The README's encoder table (markdown), from bench/results/encoders.json."""
    return _encoder_table(_load("encoders"))


def grid() -> str:
    """The README's attention-grid table (7x7 against 14x14 Lite1 features), from bench/results/encoders_grid.json."""
    return _encoder_table(_load("encoders_grid"))


def _encoder_table(d: dict[str, Any]) -> str:
    lines = ["| encoder | val CIDEr by epoch (fit's beam 3) | BLEU-4 | METEOR | CIDEr | training (s) "
             "| CPU latency, one photo (p50) |",  # training: wall clock, on a machine shared with other runs
             "|---|---|---|---|---|---|---|"]
    for row in d["results"]:
        val, training = row["val"], row["training"]
        epochs = " / ".join(f"{c:.3f}" for c in training["val_cider_by_epoch"])
        meteor = val.get("METEOR", float("nan"))
        lines.append(f"| {training['encoder']} | {epochs} | {val['Bleu_4']:.3f} | {meteor:.3f} "
                     f"| {val['CIDEr']:.3f} | {training['train_seconds']:,.0f} | {row['latency_ms_p50']:.0f} ms "
                     f"({row['latency_ratio_to_baseline']:.2f}x) |")
    return "\n".join(lines)


SCST_RUNS = ("flickr8k-scst", "scst-greedy", "scst-b50", "scst-lr5", "scst-beam", "lite1-scst", "mir-scst",
             "mir-scst-lr1", "mir-xe-scst", "v4-scst")


def scst() -> str:
    """The README's table of self-critical runs (markdown), from their committed histories in
    bench/results/training/ (each a ``fit`` run's history.json, paths made relative)."""
    lines = ["| run | started from | rewarded captions | baseline | dropout while sampling | photos a step | lr "
             "| warm-up | validation decoding (beam, length penalty, blocking) | val CIDEr by epoch "
             "| train reward by epoch |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in SCST_RUNS:
        if not (RESULTS / "training" / f"{name}.json").is_file():
            continue
        history = _history(name)
        c, epochs = history["config"], history["epochs"]
        # Runs before the dropout change (and its scst_baseline option) sampled with dropout on.
        dropout = "on" if "scst_baseline" not in c else "off"
        cider = _val_by_epoch(epochs, "CIDEr")
        reward = " / ".join(f"{e['train_reward']:.3f}" for e in epochs)
        lines.append(f"| `{name}` | `{c['init_from']}` | {c.get('scst_sampling', 'multinomial')} x{c['scst_samples']} "
                     f"| {c.get('scst_baseline', 'mean')} | {dropout} | {c['batch_size']} | {c['lr']:g} "
                     f"| {c['warmup_steps']} | {c['val_beam']}, {c['val_length_penalty']:g}, {c['val_block_ngram']} "
                     f"| {cider} | {reward} |")
    return "\n".join(lines)


def learning_loop_scst() -> str:
    """The README's table of fine-tune recipes from a self-critically trained base (markdown):
    bench/results/learning_loop_scst_base.json (the default recipe) and the variants tried."""
    files = [RESULTS / "learning_loop_scst_base.json",
             *sorted((RESULTS / "learning_loop_variants").glob("*.json"))]
    lines = ["| result file | base encoder | command options | real corrections: gate (held-out CIDEr-D, 95% bound) "
             "| concept recall | val CIDEr | random captions: gate | val CIDEr |",
             "|---|---|---|---|---|---|---|---|"]
    for path in files:
        if not path.is_file():
            continue
        d = json.loads(path.read_text())
        command = d["context"]["command"]
        words = command.split()[2:]
        # The work folder names the data folder, whose random salt chooses the held-out photos.
        options = [w for i, w in enumerate(words) if w not in ("--cache", "--out")
                   and not (i and words[i - 1] in ("--cache", "--out"))]
        good, bad = d["results"]["good"], d["results"].get("bad")
        cells = [f"`{path.relative_to(RESULTS.parent.parent)}`", _base_encoder(d), f"`{' '.join(options)}`",
                 *_real_corrections_cells(good),
                 bad["status"] if bad else "not run", f"{bad['val_cider_after']:.3f}" if bad else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def learning_loop_bases() -> str:
    """The README's table of the learning loop run from each kind of base the shipped models have been
    (markdown): a cross-entropy base on Lite0 and on Lite1, one refined self-critically (as v3 was) and
    one whose encoder's top blocks were trained with it (as v6's were)."""
    names = ["learning_loop", "learning_loop_lite1_xe_base", "learning_loop_scst_base", "learning_loop_ft_base"]
    lines = ["| result file | base encoder | base made as | real corrections: gate (held-out CIDEr-D, 95% bound) "
             "| concept recall | val CIDEr | random captions: gate "
             "| bench run time (a base already trained is reused) |",
             "|---|---|---|---|---|---|---|---|"]
    for name in names:
        d = _load(name)
        base, good, bad = d["base"], d["results"]["good"], d["results"]["bad"]
        made = f"cross-entropy, {base['epochs']} epochs"
        if base.get("scst_epochs"):
            made += f", then {base['scst_epochs']} self-critical"
        if base.get("fine_tune_blocks"):
            made += f", then 1 with the encoder's top {base['fine_tune_blocks']} blocks"
        cells = [f"`bench/results/{name}.json`", _base_encoder(d), made, *_real_corrections_cells(good),
                 bad["status"], f"{d['context']['duration_seconds'] / 60:.0f} min"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ensemble() -> str:
    """The README's ensemble table (markdown), from bench/results/ensemble.json."""
    d = _load("ensemble")
    lines = ["| what | models | beam | BLEU-4 | METEOR | CIDEr | CIDEr vs the first member | decoding (s) "
             "| decoders in float16 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in d["results"]:
        m = row["metrics"]
        meteor = f"{m['METEOR']:.4f}" if "METEOR" in m else "–"
        lines.append(f"| {row['kind']} | {' + '.join(row['models'])} | {row['decoding']['beam_size']} "
                     f"| {m['Bleu_4']:.4f} | {meteor} | {m['CIDEr']:.4f} "
                     f"| {row['ratio_to_first_member']['CIDEr']:.3f}x | {row['decode_seconds']:.0f} "
                     f"| {row['decoder_megabytes_float16']:.1f} MB |")
    return "\n".join(lines)


COMBINE_WHAT = {
    "member": "alone",
    "weights averaged": "one decoder, the mean of their weights",
    "ensemble": "both decoders, the mean of their word distributions",
    "both views": "alone, on the photo and its mirror image, the mean of its two word distributions",
    "consensus": "alone, its 5 final beams reranked by CIDEr-D against each other",
}


def combine() -> str:
    """The README's table of a model and its seed sibling combined four ways, from bench/results/combine.json."""
    d = _load("combine")
    lines = ["| how | models | BLEU-4 | METEOR | CIDEr | BLEU-4 / CIDEr vs the first model alone | decoding (s) |",
             "|---|---|---|---|---|---|---|"]
    for row in d["results"]:
        m, ratio = row["metrics"], row["ratio_to_model"]
        what = COMBINE_WHAT[row["kind"]].replace("5 final beams", f"{row['decoding']['beam_size']} final beams")
        lines.append(f"| {row['kind']}: {what} | {' + '.join(row['models'])} | {m['Bleu_4']:.4f} "
                     f"| {m['METEOR']:.4f} | {m['CIDEr']:.4f} | {ratio['Bleu_4']:.3f}x / {ratio['CIDEr']:.3f}x "
                     f"| {row['decode_seconds']:.0f} |")
    return "\n".join(lines)


DISTILL_RUNS = ("kd-seq-mir-anneal", "kd-seq-v3", "kd-w1", "kd-w2", "kd-w4", "kd-aug", "kd-aug2", "kd-aug-lr1",
                "kd-aug3t", "kd-aug8", "kd-ban", "ft2-kd", "ft2-kd-s1",
                "ft2-kd-s2", "kd-aug-s1", "kd-aug-s2")


def distill() -> str:
    """The README's table of distillation runs (markdown), from their committed histories in
    bench/results/training/ (each a ``fit`` run's history.json, paths made relative)."""
    lines = ["| run | student started from | trained on | teacher's share of each word | lr | encoder blocks trained "
             "| val CIDEr by epoch | val BLEU-4 by epoch |",
             "|---|---|---|---|---|---|---|---|"]
    for name in DISTILL_RUNS:
        history = _history(name)
        c, epochs = history["config"], history["epochs"]
        share = f"{c['distill_weight']:g} (`{c['distill_from']}`)" if c.get("distill_from") else "none"
        blocks = c["model"].get("fine_tune_blocks", 0)
        encoder = f"top {blocks}, lr {c['encoder_lr']:g}" if blocks else "none"
        cider = _val_by_epoch(epochs, "CIDEr")
        bleu = _val_by_epoch(epochs, "Bleu_4")
        lines.append(f"| `{name}` | `{c['init_from']}` | `{c['data']}` | {share} | {c['lr']:g} | {encoder} | {cider} "
                     f"| {bleu} |")
    return "\n".join(lines)


# Runs of one recipe that differ only in --seed (the first of each ran with fit's default seed).
SEED_RUNS = {"`kd-aug` (decoder only; v5, v7)": ("kd-aug", "kd-aug-s1", "kd-aug-s2"),
             "`ft2-kd` (and the encoder's top 2 blocks; v6)": ("ft2-kd", "ft2-kd-s1", "ft2-kd-s2")}


def _mean_range(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def seeds() -> str:
    """The README's table of run-to-run spread: each recipe's runs by seed, their mean and range
    (validation as fit selects: 1,000 photos, beam 5, length penalty 1.0, trigram blocking, float32)."""
    lines = ["| recipe | seed: val CIDEr / BLEU-4 | CIDEr mean (min-max) | BLEU-4 mean (min-max) |",
             "|---|---|---|---|"]
    for recipe, names in SEED_RUNS.items():
        histories = [_history(name) for name in names]
        finals = [h["epochs"][-1]["val"] for h in histories]
        runs = ", ".join(f"{h['config']['seed']}: {v['CIDEr']:.3f} / {v['Bleu_4']:.3f}"
                         for h, v in zip(histories, finals, strict=True))
        lines.append(f"| {recipe} | {runs} | {_mean_range([v['CIDEr'] for v in finals])} "
                     f"| {_mean_range([v['Bleu_4'] for v in finals])} |")
    return "\n".join(lines)


# The default model's recipe run stage by stage twice, one thing changed, all in one session:
# (stage, decoding its validation used, first run, second run), histories under bench/results/training/.
Stages = tuple[tuple[str, str, str, str], ...]
# The recipe's stages as the tables name them: (stage, decoding its validation used).
CROSS_ENTROPY = ("cross-entropy, 3 epochs, lr 4e-4", "beam 3")
ANNEALING = ("annealing, 2 epochs, lr 1e-4", "beam 10, length penalty 1.0, trigram blocking")
# v3's own stage (A3); its 512 run is v3's, which went on to a second epoch that fell back.
SELF_CRITICAL = ("self-critical on beam candidates, first epoch, lr 5e-5 (v3)", ANNEALING[1])
DISTILLATION = ("word-level distillation from v3 and v7, 1 epoch, lr 5e-5",
                "beam 5, length penalty 1.0, trigram blocking")
# The 7x7 grid against the 14x14 one (efficientnet_lite1_os16).
GRID_STAGES: Stages = (
    (*CROSS_ENTROPY, "grid/enc-lite1", "grid/enc-lite1os16"),
    (*ANNEALING, "grid/lite1-anneal", "grid/lite1os16-anneal"),
    (*DISTILLATION, "grid/kd-plain-lite1", "grid/kd-plain-lite1os16"))
# The shipped decoder's 512-unit LSTM against a 1024-unit one, on the 7x7 grid; the 512 runs are the
# grid table's and v3's.
WIDTH_STAGES: Stages = (
    (*CROSS_ENTROPY, "grid/enc-lite1", "width/enc-lite1-h1024"),
    (*ANNEALING, "grid/lite1-anneal", "width/lite1-h1024-anneal"),
    (*SELF_CRITICAL, "lite1-scst", "width/lite1-h1024-scst"),
    (*DISTILLATION, "grid/kd-plain-lite1", "width/kd-plain-lite1-h1024"))


def _stage_table(stages: Stages, first: str, second: str) -> str:
    """Each stage's best validation epoch of two runs of the recipe, and the second's CIDEr over the first's."""
    lines = [f"| stage | validation decoding | {first}: val CIDEr / BLEU-4 | {second}: val CIDEr / BLEU-4 "
             f"| CIDEr, {second} / {first} | training (s), {first} / {second} |",  # wall clock of its epochs
             "|---|---|---|---|---|---|"]
    for stage, decoding, *names in stages:
        cells, ciders, seconds = [], [], []
        for name in names:
            epochs = _history(name)["epochs"]
            best = _best_val(epochs)
            cells.append(f"{best['CIDEr']:.3f} / {best['Bleu_4']:.3f}")
            ciders.append(best["CIDEr"])
            seconds.append(f"{sum(e['train_seconds'] for e in epochs):,.0f}")
        lines.append(f"| {stage} | {decoding} | {cells[0]} | {cells[1]} | {ciders[1] / ciders[0]:.3f}x "
                     f"| {' / '.join(seconds)} |")
    return "\n".join(lines)


def grid_stages() -> str:
    """The README's table of the finer grid through the recipe."""
    return _stage_table(GRID_STAGES, "7x7", "14x14")


def width_stages() -> str:
    """The README's table of a wider decoder through the recipe."""
    return _stage_table(WIDTH_STAGES, "512", "1024")


def decoder_width() -> str:
    """The README's table of the two distilled students' quality and cost, from bench/results/decoder_width.json."""
    rows = _load("decoder_width")["results"]
    first = rows[0]
    lines = ["| decoder LSTM | BLEU-4 | METEOR | CIDEr | weights in float16 | CPU latency, one photo (p50) |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        val = row["val"]
        ratio = row["latency_ms_p50"] / first["latency_ms_p50"]
        # fit saves float32 checkpoints; `train ship` writes float16, half their size.
        lines.append(f"| {row['training']['hidden_dim']} units (`{row['run']}`) | {val['Bleu_4']:.3f} "
                     f"| {val['METEOR']:.3f} | {val['CIDEr']:.3f} | {row['weights_mb'] / 2:.1f} MB "
                     f"| {row['latency_ms_p50']:.0f} ms ({ratio:.2f}x) |")
    return "\n".join(lines)


def _teacher_table(runs: tuple[str, ...]) -> str:
    """One student recipe taught by different teachers: each run's best epoch against the first run's."""
    lines = ["| run | teachers | val CIDEr / BLEU-4 | CIDEr vs the first run | training (s) | torch threads |",
             "|---|---|---|---|---|---|"]
    first = None
    for name in runs:
        history = _history(name)
        best = _best_val(history["epochs"])
        first = first or best["CIDEr"]
        teachers = ", ".join(f"`{t}`" for t in history["config"]["distill_from"].split(","))
        seconds = sum(e["train_seconds"] for e in history["epochs"])
        lines.append(f"| `{Path(name).name}` | {teachers} | {best['CIDEr']:.3f} / {best['Bleu_4']:.3f} "
                     f"| {best['CIDEr'] / first:.3f}x | {seconds:,.0f} | {history['config']['threads']} |")
    return "\n".join(lines)


def mixed_teachers() -> str:
    """The README's table of a 7x7 student taught by 7x7 teachers alone and with a 14x14 one beside them."""
    return _teacher_table(("grid/kd-plain-lite1", "grid/kd-plain-3t"))


def wide_teacher() -> str:
    """The README's table of a 512-unit student taught by v3 and v7, and by the 1024-unit v3 and v7."""
    return _teacher_table(("grid/kd-plain-lite1", "width/kd-plain-wt"))


LINEAGE_STAGES = (("cross-entropy, lr 4e-4", "aug-xe", "mir-xe"), ("annealing, lr 1e-4", "aug-anneal", "mir-anneal"))


def lineages() -> str:
    """The README's table of the cross-entropy lineage on the four views against the mirrored one."""
    lines = ["| stage | four views: run, epochs, val CIDEr by epoch | mirrored: run, epochs, val CIDEr by epoch |",
             "|---|---|---|"]
    for stage, *runs in LINEAGE_STAGES:
        cells = []
        for name in runs:
            history = _history(name)
            epochs, beam = history["epochs"], history["config"]["val_beam"]
            cider = _val_by_epoch(epochs, "CIDEr")
            cells.append(f"`{name}`, {len(epochs)}: {cider} (beam {beam})")
        lines.append(f"| {stage} | {' | '.join(cells)} |")
    return "\n".join(lines)


def _base_encoder(document: dict[str, Any]) -> str:
    # Files written before the bench recorded the encoder trained the base on fit's default, Lite0.
    return str(document["base"].get("encoder", "efficientnet_lite0"))


def _real_corrections_cells(good: dict[str, Any]) -> list[str]:
    """A learning-loop table's cells for the fine-tune on real corrections: the gate (held-out
    CIDEr-D before and after, 95% bound), concept recall and validation CIDEr, before -> after."""
    return [f"{good['status']} ({good['heldout_corrections_before']['CIDEr-D']:.3f} -> "
            f"{good['heldout_corrections_after']['CIDEr-D']:.3f}, {_bound(good)})",
            f"{good['concept_recall_before']:.0%} -> {good['concept_recall_after']:.0%}",
            f"{good['val_cider_before']:.3f} -> {good['val_cider_after']:.3f}"]


def _bound(result: dict[str, Any]) -> str:
    """The 95% lower bound of the per-photo gain on held-out corrections. Result files written before
    the bench recorded it keep only the gate's reason, where the bound is stated in words."""
    if result.get("heldout_gain_lower_bound") is not None:
        return f"bound {result['heldout_gain_lower_bound']:+.3f}"
    reason = result["reason"]
    for marker in ("lower bound of the per-photo CIDEr-D gain ", "per-photo gain > "):
        if marker in reason:
            return "bound " + reason.split(marker, 1)[1].split(";")[0].split(")")[0]
    return "validation fell more than the margin" if "validation CIDEr dropped" in reason else reason


ROWS = {"worker": worker, "train_cache": train_cache, "scale": scale, "bot_burst": bot_burst, "encoders": encoders,
        "grid": grid, "grid_stages": grid_stages, "width_stages": width_stages,
        "decoder_width": decoder_width, "scst": scst, "learning_loop_scst": learning_loop_scst,
        "learning_loop_bases": learning_loop_bases, "seeds": seeds, "ensemble": ensemble, "distill": distill,
        "lineages": lineages, "combine": combine,
        "mixed_teachers": mixed_teachers, "wide_teacher": wide_teacher}

if __name__ == "__main__":
    print(ROWS[sys.argv[1]]())
