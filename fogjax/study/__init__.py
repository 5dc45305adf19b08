"""Stability studies: many ordinary training runs, one report (``python -m fogjax.study``).

spec.py     the study config -> validated run configs (before any run starts)
runner.py   runs them one after the other in STUDY_DIR/<run>/ (finished runs skipped)
slurm.py    or writes one sbatch array job with a task per run (--launch=slurm)
curves.py   reads each run's TensorBoard events back
figures.py  the PNG figures (matplotlib, Agg)
report.py   STUDY_DIR/report.md and STUDY_DIR/summary.json from the runs' summary.json files
"""
