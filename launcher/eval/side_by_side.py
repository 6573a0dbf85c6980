"""Base and fine-tuned answers side by side, for tasks a metric judges poorly: an HTML page and a
W&B table with each held-out prompt, its reference answer, the base model's answer and the tuned
model's, each answer with its ROUGE-L against the reference.

The base answers are those of the ``before`` evaluation: the step-0 eval of training
(``eval.before_training=true``), or ``ftl eval --baseline`` (the adapters switched off for LoRA, the
run's starting model otherwise). Without one the page says so and shows the tuned answers alone.
Every value is HTML-escaped: the eval data and the generated answers are text, never markup.
"""

from __future__ import annotations

from html import escape
from pathlib import Path
from typing import Any, Optional

from launcher.files import write_atomic

COLUMNS = ["prompt", "reference", "base", "base ROUGE-L", "tuned", "tuned ROUGE-L"]

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.3em; } p.note { color: #555; }
table { border-collapse: collapse; width: 100%; table-layout: fixed; }
th, td { border: 1px solid #ccc; padding: 0.5em; vertical-align: top; text-align: left;
         white-space: pre-wrap; overflow-wrap: anywhere; }
th { background: #f0f0f0; } td.score { text-align: right; width: 5em; white-space: nowrap; }
th.score { width: 5em; } th.n { width: 2.5em; }
tr:nth-child(even) td { background: #fafafa; }
td.better { color: #0a6b0a; font-weight: 600; } td.worse { color: #a31515; }
"""


def side_by_side_rows(before: Optional[dict[str, Any]], after: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per generated sample of ``after``: prompt, reference, base and tuned answers and
    their ROUGE-L F1 (0-100); the base fields are None without a ``before`` eval that generated."""
    from rouge_score import rouge_scorer

    tuned = after.get("samples") or []
    base = (before or {}).get("samples") or []
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)

    def rouge(reference: str, answer: str) -> float:
        return 100.0 * scorer.score(reference, answer)["rougeL"].fmeasure

    rows = []
    for i, sample in enumerate(tuned):
        # The same conversations in the same order (the first eval.num_generate): pair by index,
        # and only where the prompt matches (a changed eval split leaves the base column empty).
        pair = base[i] if i < len(base) and base[i].get("question") == sample["question"] else None
        rows.append(
            {
                "prompt": sample["question"],
                "reference": sample["reference"],
                "base": None if pair is None else pair["prediction"],
                "base_rouge": None if pair is None else rouge(sample["reference"], pair["prediction"]),
                "tuned": sample["prediction"],
                "tuned_rouge": rouge(sample["reference"], sample["prediction"]),
            }
        )
    return rows


def render_html(rows: list[dict[str, Any]], title: str) -> str:
    has_base = any(r["base"] is not None for r in rows)
    note = (
        ""
        if has_base
        else '<p class="note">No base answers: they come from the eval before training '
        "(eval.before_training=true) or from <code>ftl eval --baseline</code>.</p>"
    )
    mean = _means(rows)
    head = "".join(
        f'<th class="{c}">{escape(t)}</th>'
        for c, t in [("n", "#"), ("", "prompt"), ("", "reference")]
        + ([("", "base"), ("score", "ROUGE-L")] if has_base else [])
        + [("", "fine-tuned"), ("score", "ROUGE-L")]
    )
    body = []
    for i, r in enumerate(rows, start=1):
        cells = [f"<td>{i}</td>", _cell(r["prompt"]), _cell(r["reference"])]
        if has_base:
            cells += [_cell(r["base"]), _score(r["base_rouge"], None)]
        cells += [_cell(r["tuned"]), _score(r["tuned_rouge"], r["base_rouge"])]
        body.append(f"<tr>{''.join(cells)}</tr>")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(title)}</title><style>{STYLE}</style></head><body>\n"
        f"<h1>{escape(title)}</h1>\n{note}<p>{escape(mean)}</p>\n"
        f"<table><thead><tr>{head}</tr></thead><tbody>\n" + "\n".join(body) + "\n</tbody></table></body></html>\n"
    )


def _cell(text: Optional[str]) -> str:
    return "<td></td>" if text is None else f"<td>{escape(text, quote=True)}</td>"


def _score(value: Optional[float], base: Optional[float]) -> str:
    if value is None:
        return '<td class="score"></td>'
    kind = "" if base is None or value == base else (" better" if value > base else " worse")
    return f'<td class="score{kind}">{value:.1f}</td>'


def _means(rows: list[dict[str, Any]]) -> str:
    tuned = [r["tuned_rouge"] for r in rows]
    base = [r["base_rouge"] for r in rows if r["base_rouge"] is not None]
    text = f"{len(rows)} held-out prompts; mean ROUGE-L fine-tuned {sum(tuned) / max(1, len(tuned)):.1f}"
    return text + (f", base {sum(base) / len(base):.1f}" if base else "")


def write_side_by_side(path: Path, before: Optional[dict[str, Any]], after: dict[str, Any], title: str) -> bool:
    """The page at ``path`` for an eval that generated; False (nothing written) for one that did not."""
    rows = side_by_side_rows(before, after)
    if not rows:
        return False
    # Non-ASCII as character references: the page reads the same whatever the locale it is written in.
    write_atomic(path, render_html(rows, title).encode("ascii", "xmlcharrefreplace").decode("ascii"))
    return True


def wandb_table(rows: list[dict[str, Any]]) -> Any:
    import wandb

    return wandb.Table(
        columns=COLUMNS,
        data=[[r["prompt"], r["reference"], r["base"], r["base_rouge"], r["tuned"], r["tuned_rouge"]] for r in rows],
    )
