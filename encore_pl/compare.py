"""The `compare` command: editing runs in one Markdown table, one row per run, laid out like the
paper's tables.

    encore-pl compare runs/encore runs/memit runs/alphaedit
    encore-pl compare runs/* --out comparison.md
    encore-pl compare runs/encore runs/memit --at 1000      # the runs' state at 1,000 edits

From a checkout, `python scripts/compare.py ...` is the same.

--at N reads each run at N edits instead of at its end: the scores from its retention curve (the
point at N edits), downstream and perplexity from its downstream history, seconds per edit over
its first N edits. Generation Entropy is measured only before and after a run, so it is shown only
when N is the run's last point. One long run thus gives a whole paper-style table.

Columns: method, edits, ES / PS / NS (Efficacy / Paraphrase / Neighborhood Score, %, teacher
forced), Overall (their harmonic mean, %), gen ES / gen PS / gen NS (the same judged by the greedy
answer, %), Generation Entropy, downstream mean (mean over the downstream tasks of the
post-edit F1), perplexity (post-edit, of the downstream callback's text), seconds per edit. A value a run did not record is shown as "–". The method is followed
by the run directory's name when several runs used the same method.

Exits with code 2, naming the path, when a run directory has no results.json or it is not valid JSON.
"""

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from .reports import load_runs, run_labels

MISSING = "–"
HEADER = ["method", "edits", "ES", "PS", "NS", "Overall", "gen ES", "gen PS", "gen NS", "Generation Entropy",
          "downstream mean", "perplexity", "s/edit"]
SCORE_KEYS = ("efficacy_score", "paraphrase_score", "neighborhood_score", "overall_score",
              "generation_efficacy", "generation_paraphrase", "generation_neighborhood")


def fmt(value, digits: int = 1) -> str:
    return MISSING if value is None else f"{value:.{digits}f}"


def downstream_mean(run: dict):
    """Mean over tasks of the post-edit downstream F1, or None when the run has no downstream scores."""
    posts = [scores["post"] for scores in (run.get("downstream") or {}).values() if scores.get("post") is not None]
    return sum(posts) / len(posts) if posts else None


def perplexity(run: dict):
    return (run.get("perplexity") or {}).get("post")


def at_edits(run: dict, n: int) -> dict:
    """The run as it was after its first `n` edits, in the shape of results.json (only the keys
    the table reads). Raises ValueError naming the edit counts the run has a point at."""
    if n == run["num_edits"] and not run.get("partial"):
        return run  # a finished run's final results (a partial one has only its curves)
    point = next((p for p in run.get("retention") or [] if p["num_edits"] == n), None)
    if point is None:
        have = {p["num_edits"] for p in run.get("retention") or []}
        if not run.get("partial"):  # a finished run has its final scores; a partial one only its curve
            have.add(run["num_edits"])
        raise ValueError(f"no scores at {n} edits (it has scores at {', '.join(map(str, sorted(have))) or 'no'} "
                         "edits; evaluation.every_n_batches sets how often a run scores its edits, and a run "
                         "still going scores its last batch when the next one starts)")
    view = {"method": run["method"], "num_edits": n, **{k: point[k] for k in SCORE_KEYS if k in point}}
    batches = [b for b in run.get("history") or [] if b["num_edits"] <= n]
    if batches and batches[-1]["num_edits"] == n:
        view["seconds_per_edit"] = sum(b["seconds"] for b in batches) / n
    down = next((p for p in run.get("downstream_history") or [] if p["num_edits"] == n), None)
    if down is not None:
        first = run["downstream_history"][0]
        view["downstream"] = {t: {"pre": first[t], "post": down[t]} for t in down
                              if t not in ("num_edits", "perplexity", "protocol")}
        if "perplexity" in down:
            view["perplexity"] = {"pre": first.get("perplexity"), "post": down["perplexity"]}
    return view


def table_row(label: str, run: dict) -> list[str]:
    return [
        label,
        str(run["num_edits"]),
        fmt(run["efficacy_score"]),
        fmt(run.get("paraphrase_score")),  # absent when no request had paraphrase prompts
        fmt(run.get("neighborhood_score")),
        fmt(run["overall_score"]),
        fmt(run.get("generation_efficacy")),
        fmt(run.get("generation_paraphrase")),
        fmt(run.get("generation_neighborhood")),
        fmt(run.get("generation_entropy")),
        fmt(downstream_mean(run)),
        fmt(perplexity(run), 2),
        fmt(run.get("seconds_per_edit"), 2),
    ]


def markdown_table(rows: list[list[str]]) -> str:
    """A Markdown table with padded columns: text left-aligned, numbers right-aligned."""
    widths = [max(len(r[i]) for r in [HEADER, *rows]) for i in range(len(HEADER))]

    def line(cells):
        padded = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join([":" + "-" * (widths[0] + 1)] + ["-" * (w + 1) + ":" for w in widths[1:]]) + "|"
    return "\n".join([line(HEADER), rule, *map(line, rows)])


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> str:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="run directory holding results.json")
    parser.add_argument("--out", type=Path, metavar="FILE.md", help="also write the table to this file")
    parser.add_argument("--at", type=int, metavar="N", help="each run at N edits (from its retention curve)")
    args = parser.parse_args(argv)

    runs = load_runs(parser, args.runs)
    rows = []
    for path, label, run in zip(args.runs, run_labels(args.runs, runs), runs):
        try:
            rows.append(table_row(label, run if args.at is None else at_edits(run, args.at)))
        except KeyError as e:
            parser.error(f"{path}: results.json lacks the key {e}")
        except ValueError as e:
            parser.error(f"{path}: {e}")

    table = markdown_table(rows)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + "\n")
        print(f"wrote {args.out}", file=sys.stderr)
    return table

