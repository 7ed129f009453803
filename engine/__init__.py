"""lgesynth: controlled synthetic LGE cardiac MRI (LGESynthNet on Ray) and what it is worth."""

import os as _os

# Ray Data (2.60) keeps each running dataset's resource request in a cluster-wide, detached
# coordinator and lets it lapse only RAY_DATA_AUTOSCALING_REQUEST_EXPIRE_TIME_S (default 180 s) after
# the driver last renewed it. A live driver renews it every 10 s; a killed driver's request keeps the
# cluster's CPUs reserved, so the re-run that should resume the store gets a budget of zero and
# crawls for three minutes. 30 s still leaves a live driver three renewals of slack. Set it before
# importing ray.data (it is read once, at import) to choose another value.
_os.environ.setdefault("RAY_DATA_AUTOSCALING_REQUEST_EXPIRE_TIME_S", "30")
