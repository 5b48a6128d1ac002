"""`make fuzz`: the Postgres and HTTP protocol cores fed generated and mutated bytes, both directions.

Run with `python -m tests.fuzz.run [--quick] [--inputs N]`.
"""
