#!/usr/bin/env python3
"""Plots target/bench/report.json: one panel per benchmark, one column per
point, every round's ratio (ringvm / reference) as a dot, the median as a
bar, the interquartile range as a thick line, the target as a red tick.

A benchmark's points against a second reference (bench-blk's QEMU block
layer, reference "QEMU block layer ...") get a panel of their own beside
the ones against its main reference, so neither crowds the other.

Usage: plot_report.py REPORT_JSON OUT_PNG

Written for `make bench` (tests/src/bench/summary.rs runs it); needs only
matplotlib (Debian's python3-matplotlib).
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


# References whose points are plotted in a panel of their own.
SEPARATE_REFERENCES = ("QEMU block layer",)


def split(sec):
    """The section as one panel, or two: its points against the references
    in SEPARATE_REFERENCES go to a second one."""
    apart = [
        p
        for p in sec["points"]
        if p.get("reference", "").startswith(SEPARATE_REFERENCES)
    ]
    rest = [p for p in sec["points"] if p not in apart]
    if not apart or not rest:
        return [sec]
    second = dict(sec, points=apart, reference_in_title=True)
    second["title"] = "{} — against {}".format(
        sec.get("title", ""), apart[0].get("reference", "")
    )
    return [dict(sec, points=rest), second]


def main(src, dst):
    with open(src, encoding="utf-8") as f:
        report = json.load(f)
    sections = [
        part
        for s in report.get("sections", [])
        if s.get("points")
        for part in split(s)
    ]
    if not sections:
        sys.exit("no benchmark points in " + src)
    widths = [max(3, len(s["points"])) for s in sections]
    fig, axes = plt.subplots(
        len(sections),
        1,
        figsize=(max(8, 0.55 * max(widths) + 3), 4.2 * len(sections)),
        squeeze=False,
    )
    # One x scale for every panel, so bars keep their width where a
    # benchmark has few points.
    slots = max(widths)
    for ax, sec in zip(axes[:, 0], sections):
        panel(ax, sec)
        ax.set_xlim(-0.6, slots - 0.4)
    fig.suptitle(
        "ringvm / reference per round ({})".format(report.get("generated", "")),
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


def panel(ax, sec):
    points = sec["points"]
    xs = range(len(points))
    for x, p in zip(xs, points):
        ratios = [r for r in p.get("ratios", []) if r is not None]
        stats = p.get("ratio") or {}
        higher = p.get("better") == "higher"
        met = p.get("target_met")
        colour = "tab:green" if met else ("tab:red" if met is False else "tab:blue")
        if stats:
            ax.bar(x, stats["median"], width=0.6, color=colour, alpha=0.35)
            ax.vlines(x, stats["q1"], stats["q3"], color=colour, linewidth=4)
        # Rounds spread sideways a little so equal values stay visible.
        n = len(ratios)
        offs = [(i - (n - 1) / 2) * 0.08 for i in range(n)]
        ax.scatter([x + o for o in offs], ratios, s=14, color="black", zorder=3)
        target = p.get("target")
        if target:
            # "near": the band ratio..2-ratio around 1 (a set limit held).
            near = p.get("better") == "near"
            ticks = [target["ratio"], 2 - target["ratio"]] if near else [target["ratio"]]
            for t in ticks:
                ax.hlines(t, x - 0.35, x + 0.35, color="red", linewidth=1.5, zorder=4)
            label = (
                "±{:.2f}".format(1 - target["ratio"])
                if near
                else ("≥" if higher else "≤") + "{:.2f}".format(target["ratio"])
            )
            ax.annotate(
                label,
                (x + 0.36, target["ratio"]),
                fontsize=6,
                color="red",
                va="center",
            )
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xticks(list(xs))
    # The reference under each key, unless the panel's title names it.
    ax.set_xticklabels(
        [
            p["key"]
            if sec.get("reference_in_title")
            else "{}\n({})".format(p["key"], p["reference"])
            for p in points
        ],
        rotation=35,
        ha="right",
        fontsize=7,
    )
    ax.set_ylabel("ratio")
    ax.set_ylim(bottom=0)
    ax.set_title("{} ({})".format(sec.get("title", ""), sec.get("bench", "")), fontsize=10)
    ax.grid(axis="y", linewidth=0.3)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
