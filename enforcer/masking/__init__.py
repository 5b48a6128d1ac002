"""Inline masking of sensitive values in Postgres results and HTTP bodies (issue 7).

`load_masking(config) -> MaskingEngine`; per connection `engine.for_session(...) -> SessionMasker`
(or None), which the protocol enforcers call: plan_for/mask_data_row, mask_copy_line,
mask_text, mask_error_fields, mask_json_body, stats/take_stats.
"""
from .catalog import CATALOG_QUERY, FUNCTION_OIDS_QUERY, FUNCTIONS_QUERY, VIEWS_QUERY, catalog_from_rows
from .config import MaskingConfigError, load_masking
from .engine import MaskingEngine, SessionMasker
from .pgrow import MaskingRefused, RowPlan

__all__ = ["CATALOG_QUERY", "FUNCTION_OIDS_QUERY", "FUNCTIONS_QUERY", "VIEWS_QUERY", "catalog_from_rows", "MaskingConfigError",
           "load_masking", "MaskingEngine", "SessionMasker", "MaskingRefused", "RowPlan"]
