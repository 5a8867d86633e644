"""The roadmap's phases, one module each. Plain functions taking explicit settings and paths and
returning small JSON-able results; the Airflow DAG, the DVC stages and `python -m tasks.<phase>` all
call the same function."""
