"""The few Ray names raypose uses that are not Ray's public API, each with why no public way
exists. Nothing else in raypose imports a Ray name that starts with `_`, a `ray.*._internal`
module, or a name Ray marks DeveloperAPI. tests/test_ray_internals.py fails when the Ray in use
changes any of them (no fallback here: an import that fails is an error at once).

Import this module only where the names are needed (it imports Ray Train and Tune).
"""

# Ray Train's record of a run's finished checkpoints, in the run's folder. Ray's public
# `Result.from_path` reads it, but raises the same RuntimeError when the record is missing (a
# run that never finished a checkpoint: start from scratch) as when it cannot read it (refuse
# to resume); raypose asks for the file first to tell the two apart.
# The autoscaler's standing request for resources: the only way to ask an autoscaling cluster
# for GPU nodes before a run's placement group does (raypose.cluster.capacity). DeveloperAPI.
from ray.autoscaler.sdk import request_resources  # noqa: E402, F401
from ray.train.v2._internal.constants import (  # noqa: F401
    CHECKPOINT_MANAGER_SNAPSHOT_FILENAME as CHECKPOINT_RECORD,
)

# Ray Train's report callback for a Train run inside a Tune function: the pattern Ray's
# documentation gives for Train V2 with Tune ("Hyperparameter tuning with Ray Tune"), and the
# only way Tune gets a Train run's reports and checkpoints; Ray marks the class DeveloperAPI.
from ray.tune.integration.ray_train import TuneReportCallback  # noqa: F401

# The base class of Tune's search algorithms: raypose's StudySearcher (raypose.search.searcher) drives an
# Optuna study through Optuna's public API, and subclassing Searcher is the only way Ray documents
# to plug a search algorithm into Tune ("Implementing your own Search Algorithm"). DeveloperAPI.
from ray.tune.search import Searcher  # noqa: E402, F401

# Ray's State API, answered by the dashboard: whether a cluster can free a stopped run's placement
# group (Ray Train's own cleaner asks it; raypose.cluster.driver.state_api_available). DeveloperAPI.
from ray.util.state import list_actors  # noqa: E402, F401
from ray.util.state.exception import ServerUnavailable  # noqa: E402, F401
