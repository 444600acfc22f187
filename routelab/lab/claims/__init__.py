"""Claims: what routing papers report, re-measured with one command (``routelab reproduce``).

``registry`` holds the claims and their checks, ``runs`` the arms and the hash-keyed run
folders, ``budgets`` the training budgets, ``verdict`` the statistics, ``measures`` the
per-run metrics, ``reproduce`` the orchestration and ``report`` the table.
"""

from routelab.lab.claims.budgets import BUDGETS, Budget, get_budget
from routelab.lab.claims.registry import CLAIMS, Check, Claim, get_claims
from routelab.lab.claims.reproduce import Reproduction, planned_runs, reproduce
from routelab.lab.claims.verdict import judge

__all__ = ["BUDGETS", "CLAIMS", "Budget", "Check", "Claim", "Reproduction", "get_budget", "get_claims", "judge",
           "planned_runs", "reproduce"]
