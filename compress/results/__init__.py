"""Results of measurement: `table` (results.csv, merged by its key), `report` (report.md and
its plots), `hparams` (the TensorBoard HParams view).
"""
