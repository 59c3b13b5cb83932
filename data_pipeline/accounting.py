"""The row accounting of an ingest: totals per split from the shard results, and the printed summary.

Invariant checked by `ingest.finalize`: for every split, ok + failed + skipped == rows.
"""

from __future__ import annotations


def split_totals(results: list, split: str) -> dict:
    """ok/failed/skipped and reasons of one split, summed over the shard results (ingest.ShardResult)."""
    totals = {"rows": 0, "ok": 0, "failed": 0, "skipped": 0, "reasons": {}}
    for result in results:
        if result.split != split:
            continue
        totals["rows"] += result.num_rows
        for status, count in result.status_counts.items():
            totals[status] += count
        for reason, count in result.reason_counts.items():
            totals["reasons"][reason] = totals["reasons"].get(reason, 0) + count
    totals["reasons"] = dict(sorted(totals["reasons"].items()))
    return totals


def summary_table(totals: dict[str, dict]) -> str:
    """The accounting as printed at the end of a run (also stored in manifest.json)."""
    lines = [f"{'split':<12}{'rows':>10}{'ok':>10}{'failed':>10}{'skipped':>10}"]
    for split, t in totals.items():
        lines.append(f"{split:<12}{t['rows']:>10}{t['ok']:>10}{t['failed']:>10}{t['skipped']:>10}")
    reasons: dict[str, int] = {}
    for t in totals.values():
        for reason, count in t["reasons"].items():
            reasons[reason] = reasons.get(reason, 0) + count
    for reason, count in sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])):
        lines.append(f"  {reason:<28}{count:>10}")
    return "\n".join(lines)
