"""Merge-quality benchmark on a real LM: per-task LoRA adapters merged by PEFT's methods and ours, exact match per
task on held-out prompts, and the TC-LoRA pipeline (cluster -> per-cluster adapters -> merge) end to end.

    python -m benchmarks.quality            # full run (8 tasks, 3 seeds; ~1 h on 2 CPU cores)
    python -m benchmarks.quality --quick    # smoke run (3 tasks, 1 seed; a few minutes)

See ``benchmarks/quality/run.py`` for the protocol and the options.
"""
