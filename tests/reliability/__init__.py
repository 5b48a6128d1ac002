"""`make reliability`: fault scenarios run end to end through the real agent, enforcer and collector.

Run with `python -m tests.reliability.run [--quick] [--only NAME ...]`.
"""
