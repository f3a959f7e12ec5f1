"""Process rewards from exploration: a step-labelled data set, a step verifier, verifier-guided answers.

    rows.py       prm.jsonl rows (TRL stepwise supervision) from explore records: pure builder
    data.py       the file checks and I/O around it (`write_prm_data`: the `prm-data` command)
    consensus.py  re-explores each pit with fresh draws; agreement per row, confirmed-only filter,
                  label accuracy against a canonical rationale's first error (arith)
    tagging.py    one added step tag after each step; a row's ids and the positions its labels sit on
    metrics.py    step AUROC, balanced accuracy, negative-class F1, first-error F1 (torchmetrics)
    verifier.py   the step / outcome verifier LightningModule and the prm.jsonl LightningDataModule
    implicit.py   a DPO policy's implicit step reward, beta * log(pi / pi_ref) per step
    selectors.py  majority vote, verifier best-of-N, weighted vote, pass@N; accuracy vs N
    unit.py       what a pipeline unit calls: train a round's verifier, turn samples into candidates

Design notes: docs/design.md#process-rewards
"""

from selfexplore.prm.config import ConsensusConfig, PRMDataConfig
from selfexplore.prm.rows import TRL_COLUMNS, build_prm_rows

__all__ = ["TRL_COLUMNS", "ConsensusConfig", "PRMDataConfig", "build_prm_rows"]
