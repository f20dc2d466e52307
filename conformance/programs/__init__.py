"""Stage 4, programs: what the comparisons run.

- ``layouts``: the machine layouts (RAM, NUMA, scratch, arena) programs share;
- ``scenarios``: the deterministic scenario library, one per contract corner;
- ``machine``: the hypothesis state machine over the op language.
"""
