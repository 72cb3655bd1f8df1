"""Shared fixtures for every test tier, and Hypothesis's profiles.

Hypothesis profiles (``SPARECYCLES_HYPOTHESIS_PROFILE``, or pytest's ``--hypothesis-profile``):

- ``ci`` (the default): ``ci_examples`` examples per property, no deadline. Keeps the unit tier
  under a minute on a 2-core machine (docs/benchmarks.md, "Unit tier"); the properties assert
  the same things, on fewer inputs per run. A test's ``@settings`` sets its other options but
  not its example count, so this one bound holds everywhere.
- ``thorough``: ``thorough_examples`` per property, for a nightly run or before a release.

Failures print the ``@reproduce_failure`` blob, and the example database (``.hypothesis/``)
replays a failing input first on the next run.
"""

import os

from hypothesis import HealthCheck, settings

# LiteLLM (a client in tests/e2e/test_openai_depth.py) fetches its model price map from GitHub on
# import and retries with sleeps when it cannot: tests reach nothing outside the machine, so it
# reads the copy inside the package.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

pytest_plugins = ["fixtures_models"]

ci_examples = 20
thorough_examples = 300
hypothesis_profile_env = "SPARECYCLES_HYPOTHESIS_PROFILE"

settings.register_profile("ci", max_examples=ci_examples, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=thorough_examples, deadline=None,
                          print_blob=True, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get(hypothesis_profile_env, "ci"))
