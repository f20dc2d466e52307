"""Stage 3, compare: the model and the native kernel on one program.

- ``target``: one build under test and the model profile it is held to;
- ``diff``: both implementations run, every difference a ``Divergence``;
- ``triage``: the one policy that says which divergences are known findings;
- ``trace``: the readable, side-by-side account of a comparison.
"""
