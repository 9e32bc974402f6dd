"""The method's own regime on transformers: small models trained FROM RANDOM INITIALISATION with the MSW penalty,
then layers removed without any fine-tuning (as the paper does) by MSW ranking and by every post-hoc rule.

    OMP_NUM_THREADS=1 python -m benchmarks.scratch decoder          # character-level Llama-style decoder, Shakespeare
    OMP_NUM_THREADS=1 python -m benchmarks.scratch vision           # ViT on scikit-learn's 8x8 digits
    OMP_NUM_THREADS=1 python -m benchmarks.scratch decoder --quick  # a seconds-long smoke run (what the tests execute)

Arms (equal steps, same data order and initial weights per seed): vanilla (λ 0: distances logged, not added),
raw distances at λ 0.1, 1 and 5 with the refined direction search, the library default (relative to the input's
RMS, λ 0.03), and the paper's POT-faithful estimator (50 fresh random directions, raw, λ 5). Results go to
`benchmarks/records/scratch-<study>/<arm>/seed<S>.json`, kept in git (`outputs/benchmarks/scratch-<study>-quick` with
--quick; a rerun skips what is there); the full run replaces the study's section of `benchmarks/RESULTS.md` and
writes `benchmarks/plots/scratch_<study>_*.png`.
Budget (measured on this 2-core machine, one thread, with neighbours' load): the decoder trains 600 steps × 16
blocks of 64 characters (~95 ms a step; the loss is flat over the last fifth of its cosine schedule, ~2.0), the
ViT 1,000 steps × 32 images (~55 ms a step; training loss ~0.02). With the removal measurements (~6 s a run) the
6 arms × 3 seeds take about 20 min per study, some 40 min for both, one after the other.

Studies and arms are data in `studies.py`, the data in `data.py`, training in `train.py`, removal in
`removal.py`, tables and plots in `report.py`.
"""

from .removal import RULES, measure_removal
from .report import load_results, section, write_plots
from .runner import run_study
from .studies import STUDIES, ScratchError, ScratchStudy, check_config_source, get_study

__all__ = [
    "RULES", "STUDIES", "ScratchError", "ScratchStudy", "check_config_source", "get_study", "load_results",
    "measure_removal", "run_study", "section", "write_plots",
]
