"""Benchmarks: the reference implementation being beaten (``tbfast.bench.reference``, labelled
baseline), realistic workloads, ESD / KS / training-overhead benchmarks and the ``tbfast bench``
CLI. See BENCHMARKS.md."""
from .reference import ReferenceTempBalance, reference_esd, reference_fit
from .workloads import QUICK_WORKLOADS, WORKLOADS, get_workload

__all__ = ["ReferenceTempBalance", "reference_esd", "reference_fit", "WORKLOADS",
           "QUICK_WORKLOADS", "get_workload"]
