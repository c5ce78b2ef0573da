"""Run the study: every notebook in ``notebooks/``, in order, through papermill.

    python -m sub8.study --profile default            # what `make study` does
    python -m sub8.study --profile smoke --only 00_data 01_baseline --force

    python -m sub8.study --record-checks 00_data       # refresh the outputs nbval compares (smoke profile)

Executed notebooks land in ``results/<profile>/notebooks/``. Each notebook skips work whose outputs already exist
(unless ``force``), so a run that stopped — a failed stage, a killed process — picks up where it stopped when run
again. A failure names the notebook and the cell and exits non-zero.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from sub8 import profiles
from sub8.paths import project_root


def notebooks() -> list[Path]:
    """The study's notebooks in run order (their names start with the stage number)."""
    return sorted((project_root() / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def run_stage(notebook: Path, profile: str, force: bool) -> Path:
    """Execute one notebook with papermill; return the executed copy's path."""
    import papermill

    out = profiles.get(profile).results_dir / "notebooks" / notebook.name
    out.parent.mkdir(parents=True, exist_ok=True)
    # Progress bars redraw many times a second; in an executed notebook every redraw stays as a line. The kernel
    # inherits this environment, and tqdm reads its defaults from TQDM_* variables.
    os.environ.setdefault("TQDM_MININTERVAL", "60")
    papermill.execute_notebook(
        str(notebook),
        str(out),
        parameters={"profile": profile, "force": force},
        kernel_name="python3",
        cwd=str(notebook.parent),
        progress_bar=False,
    )
    return out


CHECK_MARK = "# NBVAL_CHECK_OUTPUT"


def record_checks(notebook: Path) -> None:
    """Run ``notebook`` on the smoke profile and store, in the source notebook, the outputs of the cells marked
    ``# NBVAL_CHECK_OUTPUT`` (those nbval compares); every other output is cleared so the source stays small."""
    import nbformat

    executed = nbformat.read(run_stage(notebook, "smoke", force=False), as_version=4)
    # papermill adds one cell (the injected parameters); drop it to line the executed cells up with the source.
    ran_cells = [c for c in executed.cells if "injected-parameters" not in c.metadata.get("tags", [])]
    source = nbformat.read(notebook, as_version=4)
    if [c.source for c in source.cells] != [c.source for c in ran_cells]:
        raise RuntimeError(f"{notebook.name} changed while it ran; record again")
    for src, ran in zip(source.cells, ran_cells):
        if src.cell_type != "code":
            continue
        checked = src.source.lstrip().startswith(CHECK_MARK)
        src.outputs = [o for o in ran.outputs if o.get("output_type") == "stream"] if checked else []
        src.execution_count = ran.execution_count if checked else None  # nbval ignores outputs of "unrun" cells
    nbformat.write(source, notebook)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="default", choices=sorted(profiles.PROFILES))
    parser.add_argument("--only", nargs="*", default=None, help="stage names (e.g. 00_data); default: all")
    parser.add_argument("--force", action="store_true", help="redo work whose outputs exist")
    parser.add_argument("--record-checks", nargs="+", metavar="STAGE", help="refresh the outputs nbval checks")
    args = parser.parse_args(argv)

    if args.record_checks:
        for name in args.record_checks:
            record_checks(project_root() / "notebooks" / f"{name}.ipynb")
            print(f"recorded the checked outputs of {name}")
        return 0

    import papermill

    stages = notebooks()
    if args.only:
        unknown = set(args.only) - {nb.stem for nb in stages}
        if unknown:
            parser.error(f"no such stage: {', '.join(sorted(unknown))}; stages: {', '.join(nb.stem for nb in stages)}")
        stages = [nb for nb in stages if nb.stem in args.only]

    start = time.perf_counter()
    for i, nb in enumerate(stages, 1):
        t0 = time.perf_counter()
        print(f"[{i}/{len(stages)}] {nb.stem} (profile {args.profile}) ...", flush=True)
        try:
            out = run_stage(nb, args.profile, args.force)
        except papermill.PapermillExecutionError as e:
            print(
                f"FAILED: {nb.name}, cell {e.exec_count} (index {e.cell_index}): {e.ename}: {e.evalue}\n"
                f"  the executed notebook with the traceback: "
                f"{profiles.get(args.profile).results_dir / 'notebooks' / nb.name}\n"
                f"  fix it and run the same command again: finished work is skipped.",
                file=sys.stderr,
            )
            return 1
        print(f"[{i}/{len(stages)}] {nb.stem} done in {time.perf_counter() - t0:.0f} s -> {out}", flush=True)
    print(f"study ({args.profile}): {len(stages)} stage(s) in {(time.perf_counter() - start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
