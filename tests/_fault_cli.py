"""``python -m _fault_cli ARGS``: the CLI (``peft_cp_merge.cli``) with a fault injected by
monkeypatching, for the kill-and-resume and failing-rank tests; the package itself has no fault hook.

``PEFT_CP_MERGE_TEST_FAIL=cluster=C,step=S[,rank=R][,mode=exit|raise]`` makes rank R (default: every rank) exit hard
(``os._exit(17)``, like a kill) or raise right after optimizer step S of cluster C. Steps are counted at
``torch.optim.AdamW.step``, which the trainer's AcceleratedOptimizer calls once per real optimizer step (not while
accumulating gradients, nor when the fp16 scaler skips a step); tests/test_library_fit.py checks that count.
"""

import os
import sys

import torch

from peft_cp_merge.cli import main
from peft_cp_merge.library import train

ENV = "PEFT_CP_MERGE_TEST_FAIL"


def install(spec: str) -> None:
    d = dict(kv.split("=", 1) for kv in spec.split(","))
    cluster, step, rank, mode = int(d["cluster"]), int(d["step"]), d.get("rank"), d.get("mode", "exit")
    state = {"cluster": None, "steps": 0}
    add_adapter, optimizer_step = train._add_cluster_adapter, torch.optim.AdamW.step

    def tracking_add(peft_model, base, c, config):
        state.update(cluster=c, steps=0)
        return add_adapter(peft_model, base, c, config)

    def failing_step(self, *args, **kwargs):
        out = optimizer_step(self, *args, **kwargs)
        state["steps"] += 1
        me = os.environ.get("RANK", "0")
        if state["cluster"] == cluster and state["steps"] == step and rank in (None, me):
            if mode == "exit":
                os._exit(17)
            raise RuntimeError(f"injected failure on rank {me} at cluster {cluster} step {step}")
        return out

    train._add_cluster_adapter = tracking_add
    torch.optim.AdamW.step = failing_step


if __name__ == "__main__":
    install(os.environ[ENV])
    sys.exit(main(sys.argv[1:]))
