"""Cedar policy for Warden: load and validate policies, decide statements and requests."""
from .engine import ALLOW, APPROVAL, DENY, Decision, PolicyEngine, StatementDecision
from .loader import PolicyError, default_schema_path, load_policies
from .store import PolicyStore

__all__ = [
    "ALLOW", "APPROVAL", "DENY", "Decision", "PolicyEngine", "PolicyError", "PolicyStore",
    "StatementDecision", "default_schema_path", "load_policies",
]
