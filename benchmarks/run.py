"""Run every benchmark: `python benchmarks/run.py` (the scaling curves with --quick).
Medians, each beside a baseline measured in the same run, with the ratio."""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import bench_deferred_mf  # noqa: E402
import bench_fastpath  # noqa: E402
import bench_files  # noqa: E402
import bench_guest  # noqa: E402
import bench_hugetlb  # noqa: E402
import bench_scaling  # noqa: E402
import bench_supervisor_death  # noqa: E402
import bench_syscall  # noqa: E402
import bench_vmm  # noqa: E402

if __name__ == "__main__":
    results = []
    for mod in (bench_fastpath, bench_syscall, bench_deferred_mf, bench_guest, bench_hugetlb,
                bench_supervisor_death, bench_vmm, bench_files, bench_scaling):      # scaling: --quick curves
        results += mod.main()
    print("\n%d figures, each beside a baseline measured in this run." % len(results))
    if "--json" in sys.argv:
        print(json.dumps(results, indent=2))
