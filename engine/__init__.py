"""lgesynth: controlled synthetic LGE cardiac MRI (LGESynthNet on Ray) and what it is worth."""

import os as _os

# Ray Data (2.60) keeps each running dataset's resource request in a cluster-wide, detached
# coordinator and lets it lapse only RAY_DATA_AUTOSCALING_REQUEST_EXPIRE_TIME_S (default 180 s) after
# the driver last renewed it. A live driver renews it every 10 s; a killed driver's request keeps the
# cluster's CPUs reserved, so the re-run that should resume the store gets a budget of zero and
# crawls for three minutes. 30 s still leaves a live driver three renewals of slack. Set it before
# importing ray.data (it is read once, at import) to choose another value.
_os.environ.setdefault("RAY_DATA_AUTOSCALING_REQUEST_EXPIRE_TIME_S", "30")

# Ray Train V2's controller polls its worker group every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (default
# 2 s): a run's start and its end are each noticed up to one interval late. The engine starts many
# short runs (every downstream trial of an evaluation or sweep), so it polls every 0.5 s (a trivial
# cost). It reaches the controller through the environment of a cluster started by this process
# (ray.init); on a standing cluster set it in the cluster's environment or the job's runtime_env.
_os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
