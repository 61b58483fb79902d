"""What the benchmarks share: the run's sizes, its random inputs, the timed paths, timing and the ratio table.

Used by the pytest-benchmark suites in bench/suites/ and by ``crd-fast bench``, so both compare the same paths on the
same inputs (docs/DESIGN.md "What fast means"). One job per module (``paths``, ``inputs``, ``fit``, ``run`` need
torch):

* ``config``: ``BenchConfig`` (sizes of a run) and ``PARTS`` (head, e2e, fit);
* ``inputs``: random backbone-like feature maps and patch rows;
* ``paths``: the timed paths (fused head, float32 reference, exact NN search, whole detector) on one case;
* ``fit``: ``CRDScorer.partial_fit`` throughput and peak memory, one child process per size;
* ``timing``: best/median of rounds, round-robin comparisons;
* ``machine``: what the timings depend on (CPU, threads, built kernels, GPU);
* ``table``: the ratio table of one run;  ``run``: one whole run for the CLI.

Times are wall clock on whatever machine runs them: read the ratios.
"""
