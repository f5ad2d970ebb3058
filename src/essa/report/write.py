"""Writing a report: ``report.md``, ``report.html`` and ``figures/`` from a study's results dict."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from essa import io
from essa.names import file_stem
from essa.report.document import Block, Bullets, FigureBlock, Heading, Paragraph, html_page, markdown, markdown_table
from essa.report.figures import CURVES_FIGURE, MEMORY_FIGURE, curves_figure, memory_figure, remove_stale_figures
from essa.report.formatting import MISSING
from essa.report.tables import header_blocks, metrics_table, probes_table, resources_table, summary_tables
from essa.report.verdict import verdict


def check_results(results: dict) -> None:
    """Name the first missing required key, instead of a KeyError from deep inside the report."""
    if not isinstance(results.get("datasets"), list):
        raise ValueError("results needs 'datasets': a list of dataset dicts")
    for i, dataset in enumerate(results["datasets"]):
        for key in ("name", "primary_metric", "cells"):
            if key not in dataset:
                raise ValueError(f"results['datasets'][{i}] ({dataset.get('name', '?')}) lacks {key!r}")
        for j, cell in enumerate(dataset["cells"]):
            for key in ("ssa", "finetune"):
                if key not in cell:
                    raise ValueError(f"cell {j} of dataset {dataset['name']!r} lacks {key!r}")


def summary_markdown(results: dict) -> str:
    """The report's summary tables as markdown (what the README of a study can quote as it is)."""
    check_results(results)
    return "\n\n".join(markdown_table(table) for table in summary_tables(results)) + "\n"


def _dataset_blocks(dataset: dict, figures_dir: Path, stem: str) -> tuple[list[Block], list[Path]]:
    """The section of one dataset, and the figures it drew into ``figures_dir``."""
    task = dataset.get("task")
    blocks: list[Block] = [Heading(f"Dataset: {dataset['name']}", 2)]
    if dataset.get("description"):
        blocks.append(Paragraph(str(dataset["description"])))
    blocks.append(Paragraph(f"Task: {task or MISSING}; primary metric: {dataset['primary_metric']}."))
    blocks += [Heading("Test metrics", 3), metrics_table(dataset), Heading("Resources", 3),
               resources_table(dataset)]
    probes = probes_table(dataset)
    if probes is not None:
        blocks += [Heading("Frozen-feature probes", 3), probes]
    figures: list[FigureBlock] = [
        figure for figure in (memory_figure(dataset, figures_dir / f"{stem}{MEMORY_FIGURE}"),
                              curves_figure(dataset, figures_dir / f"{stem}{CURVES_FIGURE}"))
        if figure is not None]
    if figures:
        blocks.append(Heading("Figures", 3))
        blocks += figures
    blocks += [Heading("Verdict", 3), Bullets(verdict(dataset))]
    return blocks, [figure.path for figure in figures]


def _unique_stems(datasets: Sequence[dict]) -> list[str]:
    """File stems of the datasets, made unique (``_2``, ``_3``...) where two names sanitise alike."""
    stems: list[str] = []
    for dataset in datasets:
        stem = base = file_stem(str(dataset["name"]))
        k = 2
        while stem in stems:
            stem, k = f"{base}_{k}", k + 1
        stems.append(stem)
    return stems


def write_report(results: dict, out_dir: str | Path) -> dict[str, Any]:
    """Write ``report.md``, a self-contained ``report.html`` and the PNG figures (``figures/``) of a study into
    ``out_dir``, replacing those of an earlier call.

    ``results``: the study's results dict (see :mod:`essa.report` for its keys).
    Returns: ``{"markdown": Path, "html": Path, "figures": [Path, ...]}``.
    """
    check_results(results)
    out_dir = Path(out_dir)
    figures_dir = out_dir / "figures"
    blocks = [*header_blocks(results), Heading("Summary", 2), *summary_tables(results)]
    figures: list[Path] = []
    for dataset, stem in zip(results["datasets"], _unique_stems(results["datasets"])):
        section, drawn = _dataset_blocks(dataset, figures_dir, stem)
        blocks += section
        figures += drawn
    remove_stale_figures(figures_dir, figures)
    md_path, html_path = out_dir / "report.md", out_dir / "report.html"
    io.write_text(md_path, markdown(blocks, out_dir))
    io.write_text(html_path, html_page(blocks, f"Study report: {results.get('name', MISSING)}"))
    return {"markdown": md_path, "html": html_path, "figures": figures}
