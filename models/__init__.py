"""Pure computation: encoders, the CLEAR projector, graph recommenders, metrics.

Nothing in here reads or writes files or config objects; every class and function takes
plain typed arguments and numpy/torch inputs.
"""
