"""One line of advice per merge method, from the quality benchmark's measurements (SmolLM2-135M, exact match; the
tables, intervals and commands are in ``benchmarks/README.md``). ``peft-cp-merge methods`` prints it under each
method; the README's "Which merge for which library" table is the long form. Margins are in points against the best
matrix merge at the same output rank R; "significant" means the paired 95% interval excludes 0.

Regimes measured: ``tasks`` (6 nearly disjoint tasks, 3 seeds), ``sources`` (3 skills x 3 data sources, 1 seed),
``library`` (TC-LoRA: a 16-task mixture clustered into k = 4 and 8 cluster adapters).
"""

from __future__ import annotations

ADVICE: dict[str, str] = {
    "iso_c": "recommended for one merged adapter at any rank: best or within 3 points of the best in every regime; "
             "best at R = sum r_t on disjoint tasks",
    "core_tsv_iso": "recommended when adapters share skills (sources regime: best at R = r and 2r); not yet "
                    "measured on disjoint tasks",
    "iso_cts": "good at R >= 2r (within 1 point of the best on sources at 2r); 9 points below on library clusters "
               "at R = r",
    "cp": "the default cp_variant='weighted' (the seeds' least-squares CP) trails the isotropic merges by 2-9 points "
          "at R = r; for a rank-r merge pass cp_variant='orth_iso' (within 1 point of the best matrix merge in "
          "every regime, never significantly different)",
    "tucker": "CtM's Tucker-2: significantly below the best matrix merge at R = r on shared-skill sources (-6.5 "
              "points); ties it at R = 2r; not recommended yet",
    "tsv": "Task Singular Vectors: 2-9 points below iso_c; the truncated-SVD baseline without the flat spectrum",
    "svd": "exact low-rank least squares (PEFT's svd, fast): fine for a few adapters of one skill, 4-9 points below "
           "the isotropic merges with many adapters",
    "knots": "KnOTS: 6 points below iso_c on disjoint tasks; the slowest of the SVD family",
    "core_ties": "TIES in the shared core space: 6 points below iso_c on disjoint tasks",
    "dc_merge": "DC-Merge at its paper's density: 20-30 points below on sources (lambda at the grid's top): tune "
                "density before use",
    "star": "STAR (spectral truncation and rescale): 8 points below the best on sources; a least-squares-like merge",
    "lora_lego": "LoRA-LEGO (rank-wise clustering, output rank = clusters): 12 points below the best on sources",
}
"""Method name -> one line of advice (what to use it for, with the measured margin)."""


def advice(name: str) -> str:
    """The advice line of ``name``, or a note that it has not been measured."""
    return ADVICE.get(name, "not measured by the quality benchmark")
