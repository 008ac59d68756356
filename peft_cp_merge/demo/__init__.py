"""Demo helpers used by ``examples/``, ``benchmarks/`` and the tests, not by the merge or the library trainer:
procedural text tasks (``tasks``), a small single-process LoRA loop on the library trainer's loop (``training``) and
teacher-forced exact match with paired bootstrap intervals (``evaluate``)."""
