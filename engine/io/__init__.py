"""Cohort input/output: EMIDEC-layout NIfTI cohorts, validation, patient-level splits, LV crops."""
