"""``python -m mclx.gpu_check`` (``make gpu-check``, ``make gpu-check-offline``): prove the
GPU path on this machine and print one JSON report on stdout; progress goes to stderr.

The checks, each in the module named for what it checks:

- :mod:`~mclx.gpu_check.environment`: versions, CUDA majors, one ONNX Runtime build,
  providers; what is missing of the optional GPU packages (TensorRT, onnxruntime-gpu);
- :mod:`~mclx.gpu_check.backends`: PyTorch on the GPU (FP32, FP16) and ONNX Runtime's
  CUDA provider;
- :mod:`~mclx.gpu_check.pipeline`: retrieval at N = 200,000 / Q = 4,096 / k = 200 on
  every array type, ``mclx infer`` end to end for each installed backend, throughput;
- :mod:`~mclx.gpu_check.engines`: TensorRT FP16 and FP32 engines and their parity, a
  refused engine;

sharing the inputs of :mod:`~mclx.gpu_check.workspace`; :mod:`~mclx.gpu_check.runner`
runs them and writes the report; :mod:`~mclx.gpu_check.probe` asks the driver for a GPU
(stdlib only, runnable as a script). ``wheels.txt`` and ``offline.sh`` are the offline
recipe of a bare CUDA machine (``make gpu-wheels``, ``make gpu-check-offline``,
docs/gpu.md).

A check whose package is not installed (TensorRT, ONNX Runtime's CUDA build: a bare CUDA
machine has neither) is skipped with the reason, and every backend that is installed
runs on its own. Exit status: 0 every check that ran passed (the others skipped, the
report says which and why); 1 a check that ran failed; 2 bad arguments; 77 skipped: no
NVIDIA GPU here (one JSON line with the reason, the automake/ctest convention for
"skipped": nothing was proven, and it is not a pass). ``--probe`` only looks for a GPU
(0 or 77) without importing any GPU library; ``--list`` lists the checks.
"""

from __future__ import annotations

from mclx.gpu_check.runner import (
    REPORT_VERSION,
    SKIPPED,
    Check,
    default_checks,
    main,
    probe,
    report,
    run_checks,
    skipped,
)

__all__ = [
    "REPORT_VERSION",
    "SKIPPED",
    "Check",
    "default_checks",
    "main",
    "probe",
    "report",
    "run_checks",
    "skipped",
]
