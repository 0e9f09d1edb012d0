"""Paired decode speed of two engines' reasoners: the same prompts, alternating which goes first,
per-token decode time of each and the distribution of their ratio (robust on a noisy machine).

    .venv/bin/python benchmarks/compare_decode.py A.engine B.engine --reps 20

Both must generate the same text (checked): compare builds of one model (another graph layout,
another runtime), not different precisions.
"""

from __future__ import annotations

import argparse

import numpy as np

TITLES = ["Men Navy Blue Solid Round Neck T-shirt", "Women Black Printed Kurta", "Puma Men White Sneakers",
          "Fossil Women Rose Gold Watch", "Nike Men Grey Track Pants", "Lavie Women Brown Handbag"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--task", default="trace")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    args = ap.parse_args(argv)
    from sdk.reasoner import Reasoner

    engines = [Reasoner(p, threads=1) for p in (args.a, args.b)]
    per_token: list[list[float]] = [[], []]
    for rep in range(args.reps):
        for title in TITLES:
            texts = [None, None]
            for k in ((0, 1) if rep % 2 == 0 else (1, 0)):
                texts[k] = engines[k].generate(text=title, task=args.task, max_new_tokens=args.max_new_tokens)
                st = engines[k].last_stats
                per_token[k].append(st["decode_s"] / max(st["new_tokens"] - 1, 1))
            if texts[0] != texts[1]:
                raise SystemExit(f"the engines write different text for {title!r}: {texts[0]!r} vs {texts[1]!r}")
    a, b = (np.asarray(t) for t in per_token)
    ratio = a / b
    print(f"per-token decode, median: A {np.median(a) * 1e6:.0f} us, B {np.median(b) * 1e6:.0f} us; "
          f"B's speed-up over A: median {np.median(ratio):.3f} (quartiles {np.percentile(ratio, 25):.3f}-"
          f"{np.percentile(ratio, 75):.3f}, {len(ratio)} pairs)")


if __name__ == "__main__":
    main()
