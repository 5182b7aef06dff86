"""Long fuzzing run of the STAR, .thu and MRC readers (the properties of ``tests/test_fuzz.py``).

Runs each property of the test file with fresh random cases (not the CI suite's fixed ones) in
rounds of ``--round`` examples until ``--minutes`` are spent, then prints how many cases were tried
and how they ended (read, or the project's ``InputError``). Any other exception, or a read slower
than the hang limit, stops the run with hypothesis' minimal failing example and exit status 1.

Example (3 minutes)::

    python benchmarks/fuzz_long.py --minutes 3
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import sys
import time
from datetime import timedelta
from pathlib import Path

from _common import work_folder
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

TESTS = Path(__file__).resolve().parent.parent / "tests" / "test_fuzz.py"


def load_harness():
    spec = importlib.util.spec_from_file_location("numba_recon_fuzz_harness", TESTS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=3.0, help="total time budget")
    parser.add_argument("--round", type=int, default=250, help="examples per hypothesis run")
    args = parser.parse_args()

    h = load_harness()
    with work_folder(None, "numba_recon_fuzz_") as work:
        run_all(args, h, work)


def run_all(args: argparse.Namespace, h, work: Path) -> None:
    corpus = h.make_corpus(work)
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    config = settings(max_examples=args.round, deadline=timedelta(seconds=5), derandomize=False, database=None,
                      suppress_health_check=list(HealthCheck))

    @config
    @given(seed=st.sampled_from(h.STAR_SEEDS), ops=h.text_mutations, permissive=st.booleans())
    def star(seed, ops, permissive):
        content = h.mutate_text(corpus[seed].read_bytes(), ops)
        counts["STAR"][h.check_star(corpus[seed].with_name("fuzz.star"), content, permissive)] += 1

    @config
    @given(seed=st.sampled_from(h.STAR_SEEDS), ops=h.number_mutations)
    def star_numbers(seed, ops):
        content = h.mutate_text(corpus[seed].read_bytes(), ops)
        counts["STAR numbers"][h.check_star(corpus[seed].with_name("numbers.star"), content, False)] += 1

    @config
    @given(ops=h.text_mutations, permissive=st.booleans())
    def thu(ops, permissive):
        content = h.mutate_text(corpus[h.THU_SEED].read_bytes(), ops, whitespace_table=True)
        counts[".thu"][h.check_thu(corpus[h.THU_SEED].with_name("fuzz.thu"), content, permissive)] += 1

    @config
    @given(seed=st.sampled_from(h.MRC_SEEDS), ops=h.mrc_mutations)
    def mrc(seed, ops):
        content = h.mutate_mrc(corpus[seed].read_bytes(), ops)
        counts["MRC"][h.check_mrc(corpus[seed].with_name("fuzz.mrcs"), content)] += 1

    @config
    @given(ops=h.mrc_mutations)
    def star_stack(ops):
        stack = h.mutate_mrc((corpus["relion31.star"].parent / "Particles" / "stack_a.mrcs").read_bytes(), ops)
        kind = h.check_star_with_stack(corpus["relion31.star"].parent, stack, corpus["relion31.star"].read_bytes())
        counts["STAR + MRC stack"][kind] += 1

    properties = [star, star_numbers, thu, mrc, star_stack]
    t_end = time.monotonic() + 60 * args.minutes
    rounds = 0
    t0 = time.monotonic()
    try:
        while time.monotonic() < t_end:
            properties[rounds % len(properties)]()
            rounds += 1
    finally:
        total = sum(sum(c.values()) for c in counts.values())
        print(f"{total} cases in {time.monotonic() - t0:.0f} s ({rounds} rounds of up to {args.round})")
        for name, c in counts.items():
            print(f"  {name:<18} {sum(c.values()):>7} cases: {c['ok']:>6} read, {c['input_error']:>6} InputError")
    print("no crash, no other exception type, no hang")


if __name__ == "__main__":
    sys.exit(main())
