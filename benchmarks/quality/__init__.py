"""Quality benchmark: does training-time collapse beat post-hoc depth pruning at equal compute?

    python -m benchmarks.quality minilm            # the MiniLM-L6 study (k = 1, 2, 3; seeds 0, 1, 2)
    python -m benchmarks.quality smollm2           # the SmolLM2-135M study (k = 4, 8; one seed, short schedule)
    python -m benchmarks.quality minilm --quick    # a minutes-long smoke run (what the tests execute)
    python -m benchmarks.quality report            # regenerate benchmarks/RESULTS.md and the plots from the JSON
    python -m benchmarks.quality arms              # list the arms

Results go to `benchmarks/records/<study>/<arm>/seed<S>_k<K>.json`, kept in git (the shared fine-tunes under
`<study>/cache` are not), so a new checkout resumes a study where an earlier session stopped; a rerun skips what
is there (a killed study loses at most the arm in progress). `--quick` runs go to `outputs/benchmarks/<study>-quick`.
Arms live in `arms.py` (a registry: one function per arm), studies in `studies.py`, the shared fine-tunes and
measurements in `context.py`, the tables and plots in `report.py`.
"""

from .arms import ARMS, arm, result
from .context import ModelKey
from .report import write_report
from .runner import StudyError, check_study, run_study
from .studies import STUDIES, Study, get_study

__all__ = ["ARMS", "STUDIES", "ModelKey", "Study", "StudyError", "arm", "check_study", "get_study", "result", "run_study", "write_report"]
