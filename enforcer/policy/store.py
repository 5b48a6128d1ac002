"""The active policy engine, replaced on reload only by one that loaded cleanly.

A policy (or schema) change that fails to parse or validate is refused: the previous
engine keeps deciding and `on_rejected` receives the PolicyError (file, line, reason) so
the agent can record `agent.policy_rejected`. `maybe_reload()` is cheap (a few stat
calls) and is meant to be polled; SIGHUP handlers call `reload()`.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Mapping, Optional

from enforcer.sqlclass import DEFAULT_DANGEROUS, SqlClassifier

from .engine import Decision, PolicyEngine, StatementDecision
from .loader import PolicyError, default_schema_path, policy_files


class PolicyStore:
    def __init__(self, policy_path: str, schema_path: Optional[str] = None,
                 groups: Optional[Mapping[str, Iterable[str]]] = None,
                 dangerous_functions: frozenset[str] = DEFAULT_DANGEROUS,
                 on_rejected: Optional[Callable[[PolicyError], None]] = None,
                 on_loaded: Optional[Callable[[PolicyEngine], None]] = None,
                 **engine_options: Any):
        """Loads the policy now; raises PolicyError if it is bad (there is nothing to fall back on)."""
        self.policy_path = policy_path
        self.schema_path = schema_path
        self.groups = groups
        self.dangerous_functions = dangerous_functions
        self.engine_options = engine_options
        self.on_rejected = on_rejected
        self.on_loaded = on_loaded
        self.generation = 0
        self.last_error: Optional[PolicyError] = None
        self._snapshot = self._files_state()
        self.engine: PolicyEngine = self._build()
        self._loaded()

    # -- reload ------------------------------------------------------------------------
    def reload(self, **changes: Any) -> bool:
        """Load again from the files (optionally with new groups or engine options).

        Returns True if the new policy is active, False if it was refused.
        """
        previous = (self.groups, self.dangerous_functions, dict(self.engine_options))
        self.groups = changes.pop("groups", self.groups)
        self.dangerous_functions = changes.pop("dangerous_functions", self.dangerous_functions)
        self.engine_options.update(changes)
        self._snapshot = self._files_state()
        try:
            engine = self._build()
        except PolicyError as error:
            self.groups, self.dangerous_functions, self.engine_options = previous
            self.last_error = error
            if self.on_rejected is not None:
                self.on_rejected(error)
            return False
        self.engine = engine
        self._loaded()
        return True

    def maybe_reload(self) -> Optional[bool]:
        """Reload if a policy or schema file changed; None when nothing changed."""
        if self._files_state() == self._snapshot:
            return None
        return self.reload()

    def _build(self) -> PolicyEngine:
        return PolicyEngine.from_files(self.policy_path, self.schema_path, self.groups,
                                       self.dangerous_functions, **self.engine_options)

    def _loaded(self) -> None:
        self.generation += 1
        self.last_error = None
        if self.on_loaded is not None:
            self.on_loaded(self.engine)

    def _files_state(self) -> tuple:
        files = policy_files(self.policy_path) if os.path.isdir(self.policy_path) else []
        paths = [self.policy_path, *files, self.schema_path or default_schema_path()]
        state = []
        for path in paths:
            try:
                st = os.stat(path)
                state.append((path, st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                state.append((path, None, None, None))
        return tuple(state)

    # -- decisions, delegated to the active engine ---------------------------------------
    def decide_sql(self, identity: str, identity_attrs: Optional[dict], target: str, sql: str,
                   approved: bool = False, classifier: Optional[SqlClassifier] = None) -> list[StatementDecision]:
        return self.engine.decide_sql(identity, identity_attrs, target, sql, approved, classifier)

    def decide_http(self, identity: str, identity_attrs: Optional[dict], target: str, method: str,
                    host: str, path: str, headers: Optional[dict] = None, approved: bool = False) -> Decision:
        return self.engine.decide_http(identity, identity_attrs, target, method, host, path, headers, approved)

    def decide_connect(self, identity: str, identity_attrs: Optional[dict], target: str) -> Decision:
        return self.engine.decide_connect(identity, identity_attrs, target)

    def new_session_classifier(self, known: Optional[dict] = None) -> SqlClassifier:
        return self.engine.new_session_classifier(known)

    @property
    def version(self) -> int:
        """Changes on every successful reload: callers keying their own caches on it never serve a stale decision."""
        return self.generation

    def cache_stats(self) -> dict:
        return dict(self.engine.cache_stats(), generation=self.generation)
