"""One line of advice per merge method, from the quality benchmark's measurements (SmolLM2-135M, exact match; the
tables, intervals and commands are in ``benchmarks/README.md``). ``peft-cp-merge methods`` prints it under each
method; the README's "Which merge for which library" table is the long form. Margins are in points against the best
matrix merge at the same output rank R; "significant" means the paired 95% interval excludes 0.

Regimes measured: ``tasks`` (6 nearly disjoint tasks, 3 seeds), ``sources`` (3 skills x 3 data sources, 3 seeds),
``library`` (TC-LoRA: a 16-task mixture clustered into k = 4 and 8 cluster adapters).
"""

from __future__ import annotations

ADVICE: dict[str, str] = {
    "iso_c": "recommended for one merged adapter: the best matrix merge at R = r on 4 library clusters and at "
             "R = 2r on disjoint tasks, within 2.1 points of the best elsewhere at R = r; best at R = sum r_t on "
             "disjoint tasks",
    "core_tsv_iso": "recommended for one merged adapter: the best matrix merge at R = r on disjoint tasks, on "
                    "shared-skill sources and on 8 library clusters; 1.4 points below iso_c on 4 clusters",
    "iso_cts": "the best matrix merge of one skill's three source adapters; within 1 point of the best on sources "
               "at R = r (2.2 below at 2r); 3-6 points below at R = r on library clusters, and 19 below on their "
               "held-out formats",
    "cp": "the default cp_variant='weighted' (the seeds' least-squares CP) is 2.3-9.0 points below the best matrix "
          "merge at R = r in every regime; for a rank-r merge pass cp_variant='orth_iso' (+1.0 on 4 library "
          "clusters, -0.6 on disjoint tasks, -1.2 on sources, but -4.0 on 8 clusters and -9.0 on 24 sources); "
          "cp_variant='cts' leads at R = 2r on disjoint tasks (+1.0, not significant)",
    "tucker": "CtM's Tucker-2: the best row on shared-skill sources at R = r (+1.2, not significant) but "
              "significantly below the best matrix merge in every other view (-1.7 to -10.6 points) and 12x slower "
              "than cp; not recommended",
    "tsv": "Task Singular Vectors: within 1 point of the best on sources at R = r, otherwise 2-9 points below the "
           "best isotropic merge; the truncated-SVD baseline without the flat spectrum",
    "svd": "exact low-rank least squares (PEFT's svd, fast): within 2 points of the best for a few adapters of one "
           "skill; 1.7-8.2 points below the isotropic merges with many adapters",
    "knots": "KnOTS: 6 points below iso_c on disjoint tasks; the slowest of the SVD family",
    "core_ties": "TIES in the shared core space: 6 points below iso_c on disjoint tasks",
    "dc_merge": "DC-Merge at its paper's density: 17-32 points below the best on sources (lambda 16-64, inside "
                "the grid): tune density before use",
    "star": "STAR (spectral truncation and rescale): 2-8 points below the best at R = r, like the least-squares "
            "merges",
    "lora_lego": "LoRA-LEGO (rank-wise clustering, output rank = clusters): 11 points below the best on sources",
}
"""Method name -> one line of advice (what to use it for, with the measured margin)."""


def advice(name: str) -> str:
    """The advice line of ``name``, or a note that it has not been measured."""
    return ADVICE.get(name, "not measured by the quality benchmark")
