"""The report of a study (``essa run``): ``report.md`` and a self-contained ``report.html`` in one directory.

    from essa.report import write_report, verdict
    paths = write_report(results, "runs/quickstart")   # {"markdown": Path, "html": Path, "figures": [Path, ...]}
    for line in verdict(results["datasets"][0]):
        print(line)

``results`` is the study's JSON-able summary (the study saves the same dict as ``results.json``). Required keys:
``datasets``, and in each dataset ``name``, ``primary_metric`` and ``cells``, and in each cell ``ssa`` and
``finetune``. Everything else is optional and shown as "–" (or left out) when absent: the study's ``name``,
``backbone``, ``wall_seconds``, ``budget`` (every key printed), ``notes``; a dataset's ``task``, ``description``,
``probes`` (``backbone``, ``method``, ``metrics``, and ``ssa``: the SSA label of its backbone, ``none`` for the
foundation model), ``ssa_curves``; a cell's ``ssa_tuner`` and ``finetune_tuner`` (``{"name", "options"}``: the
tuners behind its labels), ``status`` (default ``pending``), ``error``, ``seeds`` (seed -> test metrics),
``objective`` of a cell or probe (its SSA objective, None without SSA; missing: dinov2, as in results written before
the study recorded it; the tables get an objective column when any is not dinov2),
``ssa_resources`` and ``finetune_resources`` (``trainable_params``, ``peak_memory_mib``, ``images_per_s``; SSA
also ``weight_change``, the relative L2 change of the backbone weights from the foundation model to the SSA export).

Per dataset the report holds: a test-metric table (one row per cell, every metric as mean ± std over the finished
seeds, the best primary metric in bold), a resource table, the frozen-feature probes, the primary metric against
peak training memory (``figures/<dataset>_metric_vs_memory.png``), the SSA kNN curves
(``figures/<dataset>_ssa_curves.png``) and a verdict computed from the numbers (:func:`verdict`).

Statistics (:func:`essa.evaluate.metrics.seed_summary`, as ``essa finetune``'s summary): a NaN seed makes its
cell's mean NaN (it is shown, not hidden); the std has ddof=1 and is shown only with two seeds or more. Every
metric is taken as higher-is-better. Seed-dict keys that are not metrics (95 % interval bounds
``*_ci_low``/``*_ci_high``, resource keys, ``auc_skipped_labels``, ``predicted_share``, ``label_share``,
``class_weights``) get no column, so the study may pass a finetune run's per-seed ``test`` dict as it is.

A cell with a seed that predicts (almost) one class (:func:`one_class_seeds`: the seed's ``predicted_share``, the
fraction of the test images in its most-predicted class, is at least :data:`ONE_CLASS_SHARE` and above its
``label_share``, that of the most frequent true class) is marked ``⚠ one class (k/n seeds)`` in the tables, never
bold, never the verdict's best cell, and named in the verdict. ``essa finetune`` writes both shares into each seed's
test row; a seed dict without them is not flagged.

The verdict compares cells by SSA tuner: the cells without SSA (``ssa_tuner`` ``none``), and APLA-SSA against
full-SSA cells of the same objective (``ssa_tuner`` ``apla`` and ``full``, whatever their labels); for results
without ``ssa_tuner`` (written before the study recorded it) the label's first word is taken as the tuner.

Every file is written to a temporary file and renamed, so an interrupted study never leaves half a report; figures
of earlier calls that this call did not redraw are removed, so ``figures/`` matches the report.

Modules: :mod:`~essa.report.stats` (the numbers read from the results), :mod:`~essa.report.verdict`,
:mod:`~essa.report.tables`, :mod:`~essa.report.figures`, :mod:`~essa.report.document` (the blocks of a report and
their markdown and HTML renderers), :mod:`~essa.report.formatting` and :mod:`~essa.report.write` (the files).
"""


from essa.evaluate.metrics import Summary
from essa.report.stats import ONE_CLASS_SHARE, cell_summary, one_class_seeds
from essa.report.verdict import verdict
from essa.report.write import summary_markdown, write_report

__all__ = ["ONE_CLASS_SHARE", "Summary", "cell_summary", "one_class_seeds", "summary_markdown", "verdict",
           "write_report"]
